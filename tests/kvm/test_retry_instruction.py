"""KVM before 6.12 unprotects and retries an instruction before emulating it (x86.c retry_instruction,
`VM(retry_pf_emulation=True)`, kvm/emulate_retry.py).

Expected values from KVM 6.1's code: kvm_mmu_page_fault sets EMULTYPE_ALLOW_RETRY_PF for a
RET_PF_EMULATE of the full fault path unless the address is MMIO in the vCPU's cache;
retry_instruction resets last_retry_{eip,addr} on every call, declines for emulate.c's PageTable
instructions and for the RIP+address it retried last, else unprotects the gfn and re-enters the guest
(the guest's next try is another exit, full fault and decode).  The lab measured the same on a read-only
slot (tests/realdiff/lab/npt.json, readonly_slot_cpl0: two write faults at the gpa of `add qword
[ro], 7`, one for each `mov`).
"""

from __future__ import annotations

import iced_x86 as ix
import pytest

import kvmmu
from kvmmu import KVM_MEM_READONLY
from kvmmu.guest.pagetables import RW, US, GuestPageTables, P, vm_writer
from kvmmu.kvm.emulate_retry import page_table_writing_insn
from tests.kvm.harness import LONG_MODE, MMIO_GPA, MMIO_GVA, MiB

RO = 0x80_0000
RIP = 0x40_1000
KEYS = ("exits", "pf_taken", "pf_emulate", "insn_emulation", "mmio_exits")


def _vm(retry: bool = True, mmu: str = "npt") -> tuple[kvmmu.VM, kvmmu.Vcpu]:
    vm = kvmmu.VM(mmu=mmu, retry_pf_emulation=retry)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=8 * MiB)
    vm.set_user_memory_region(slot=1, guest_phys_addr=RO, memory_size=0x10000, flags=KVM_MEM_READONLY)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=0x10_0000)
    pt.map(RO, RO, flags=P | RW | US)
    pt.map(RO + 0x1000, RO + 0x1000, flags=P | RW | US)
    pt.map(MMIO_GVA, MMIO_GPA, flags=P | RW | US)
    vm.mmio_handler = lambda exit_: None
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert vcpu.access(RO, 8, "read").fault is None          # the page is mapped, read-only
    return vm, vcpu


def _write(vcpu: kvmmu.Vcpu, gva: int, insn: tuple[int, bool] | None) -> dict[str, int]:
    before = dict(vcpu.stats)
    vcpu.emul_insn = insn                  # what a CPU model sets for the instruction it executes
    try:
        r = vcpu.access(gva, 8, "write", 7)
    finally:
        vcpu.emul_insn = None
    assert r.fault is None and [e.is_write for e in r.exits] == [True]
    return {k: vcpu.stats[k] - before[k] for k in KEYS}


ONCE = dict(exits=1, pf_taken=1, pf_emulate=1, insn_emulation=1, mmio_exits=1)
RETRIED = dict(exits=2, pf_taken=2, pf_emulate=2, insn_emulation=2, mmio_exits=1)


def test_a_write_to_a_read_only_slot_is_retried_once_before_it_is_emulated() -> None:
    vm, vcpu = _vm()
    assert _write(vcpu, RO + 0x20, (RIP, False)) == RETRIED
    assert vcpu.last_retry == (0, 0)       # the emulation's own call reset the guard
    assert [(e.phys_addr, e.is_write) for e in vm.mmio_log] == [(RO + 0x20, True)]


@pytest.mark.parametrize("insn", [(RIP, True), None], ids=["page-table-writing", "no-instruction"])
def test_no_retry_for_a_page_table_writing_instruction_or_without_one(insn: tuple[int, bool] | None) -> None:
    _vm_, vcpu = _vm()
    assert _write(vcpu, RO + 0x20, insn) == ONCE


def test_todays_kvm_does_not_retry_a_read_only_slot() -> None:
    _vm_, vcpu = _vm(retry=False)
    assert _write(vcpu, RO + 0x20, (RIP, False)) == ONCE


def test_the_guard_is_reset_by_each_emulation() -> None:
    """The same instruction faulting again later (a loop) is retried again: the emulation that ended
    the previous attempt cleared last_retry_eip/addr."""
    _vm_, vcpu = _vm()
    assert _write(vcpu, RO + 0x20, (RIP, False)) == RETRIED
    assert _write(vcpu, RO + 0x20, (RIP, False)) == RETRIED
    assert _write(vcpu, RO + 0x1020, (RIP, False)) == RETRIED


def test_cached_mmio_is_never_retried() -> None:
    """The first write to a gpa without a memslot caches the MMIO info (handle_abnormal_pfn), so
    mmio_info_in_cache keeps EMULTYPE_ALLOW_RETRY_PF off; the later ones take the MMIO fast path."""
    _vm_, vcpu = _vm()
    first = _write(vcpu, MMIO_GVA, (RIP, False))       # (after faults on its guest tables' pages)
    assert (first["pf_emulate"], first["insn_emulation"], first["mmio_exits"]) == (1, 1, 1)
    assert _write(vcpu, MMIO_GVA + 8, (RIP, False)) == dict(ONCE, pf_taken=0, pf_emulate=0)


def test_shadow_paging_unprotects_the_guest_table_and_the_retry_writes_natively() -> None:
    """Under shadow paging the gfn of a shadowed guest table is write-protected: a non-page-table
    instruction writing it is retried after kvm_mmu_unprotect_page zapped the shadow page, and the
    retried write is then an ordinary write fault (mapped writable), not an emulation."""
    vm = kvmmu.VM(mmu="shadow", retry_pf_emulation=True)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=8 * MiB)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=0x10_0000)
    pt.map(0x40_0000, 0x40_0000, flags=P | RW | US)
    # The page directory (a level-2 table is never unsync), writable at `alias`, in another 1 GiB
    # range so that zapping its shadow page leaves the alias's own translation alone.
    table = pt.entry_addr(0x40_0000, 2, create=False) & ~0xFFF
    alias = 0x4000_0000
    pt.map(alias, table, flags=P | RW | US)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert vcpu.access(0x40_0000, 8, "read").fault is None     # the directory is shadowed now
    assert vcpu.access(alias + 0x800, 8, "read").fault is None
    before, zapped = dict(vcpu.stats), vm.stats["mmu_shadow_zapped"]
    emulated = vcpu.counters["emulated_accesses"]
    vcpu.emul_insn = (RIP, False)
    try:
        assert vcpu.access(alias + 0x800, 8, "write", 0).fault is None
    finally:
        vcpu.emul_insn = None
    assert vm.stats["mmu_shadow_zapped"] > zapped
    assert vcpu.counters["emulated_accesses"] == emulated      # the write ran on the retried instruction
    assert (vcpu.stats["pf_emulate"] - before["pf_emulate"], vcpu.stats["pf_fixed"] - before["pf_fixed"]) == (1, 1)


def _decode(code: bytes) -> ix.Instruction:
    return ix.Decoder(64, code).decode()


@pytest.mark.parametrize(("code", "expected"), [
    (bytes.fromhex("48834620" "07"), False),       # add qword [rsi+0x20], 7
    (bytes.fromhex("c74610efbeadde"), True),        # mov dword [rsi+0x10], imm32 (group11)
    (bytes.fromhex("488918"), True),                # mov [rax], rbx
    (bytes.fromhex("488b18"), False),               # mov rbx, [rax]: no memory destination
    (bytes.fromhex("f30f7f07"), False),             # movdqu [rdi], xmm0
    (bytes.fromhex("0918"), True),                  # or [rax], ebx
    (bytes.fromhex("2118"), True),                  # and [rax], ebx
    (bytes.fromhex("3118"), False),                 # xor [rax], ebx
    (bytes.fromhex("488718"), True),                # xchg [rax], rbx
    (bytes.fromhex("f0480fb118"), True),            # lock cmpxchg [rax], rbx
    (bytes.fromhex("480fba2803"), True),            # bts qword [rax], 3
    (bytes.fromhex("480fba3003"), False),           # btr qword [rax], 3
    (bytes.fromhex("48ab"), False),                 # stosq
    (bytes.fromhex("48a5"), False),                 # movsq
])
def test_page_table_writing_insn_follows_emulate_c(code: bytes, expected: bool) -> None:
    assert page_table_writing_insn(_decode(code)) is expected
