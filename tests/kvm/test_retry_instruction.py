"""KVM 6.1's retry_instruction on a write to a read-only memslot (Vcpu.retry_insn, set by the svm-*
profiles' CPU bus).  Expected values: arch/x86/kvm/x86.c (6.1) x86_emulate_instruction decodes the
instruction (insn_emulation), then retry_instruction unprotects the gfn and re-enters the guest once for
an instruction that is not page-table writing, unless the same rip faulted on the same address last
time; measured in the lab (tests/realdiff/lab/npt-legacy.json, readonly_slot_cpl0: exits, pf_taken,
pf_emulate and insn_emulation each one more than without the retry, two fast_page_fault lines for the
one `add`)."""

from __future__ import annotations

import pytest

import kvmmu

RO = 0x80_0000


def _run(retry: tuple[int, bool] | None, accesses: int = 1) -> dict[str, int]:
    vm = kvmmu.VM(mmu="npt", tdp_mmu=False)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=1 << 20)
    vm.set_user_memory_region(slot=1, guest_phys_addr=RO, memory_size=0x10000, flags=2)
    vm.mmio_handler = lambda ex: None
    v = vm.create_vcpu()
    v.set_sregs(cr0=0x11, cr4=0, efer=0)          # protected mode, paging off: gva = gpa
    v.retry_insn = retry
    before = dict(v.stats)
    for _ in range(accesses):
        r = v.access(RO + 0x20, 4, "write", 7)
        assert r.fault is None and r.exits and r.exits[0].is_write
    return {n: v.stats[n] - before.get(n, 0) for n in ("exits", "pf_taken", "pf_emulate", "insn_emulation")}


def test_a_non_page_table_writing_instruction_is_retried_once() -> None:
    base = _run(None)
    retried = _run((0x1000, False))
    assert {n: retried[n] - base[n] for n in base} == {"exits": 1, "pf_taken": 1, "pf_emulate": 1,
                                                        "insn_emulation": 1}


def test_a_page_table_writing_instruction_is_emulated_at_once() -> None:
    assert _run((0x1000, True)) == _run(None)


@pytest.mark.parametrize("accesses", [2, 3])
def test_the_same_rip_and_address_retries_again_after_an_emulation(accesses: int) -> None:
    """Each emulation resets last_retry_eip/addr, so the next execution of the instruction retries again."""
    base = _run(None, accesses)
    retried = _run((0x1000, False), accesses)
    assert retried["pf_emulate"] - base["pf_emulate"] == accesses
