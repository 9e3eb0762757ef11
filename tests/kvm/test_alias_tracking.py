"""Two memslots on one userspace_addr under shadow paging (issue 15, F6).

KVM accepts such aliases and tracks writes to shadowed guest tables by gfn
(kvm_slot_page_track_add_page / kvm_gfn_is_write_tracked, mmu_try_to_unsync_pages): a guest store to
its page table through the alias gfn is a plain RAM write, and the shadow keeps the old translation
across INVLPG and MOV CR3.  `kvm_deviations=True` (and the host profiles) reproduce that; by default
the model tracks by host page, so the store is seen, as the SDM promises (a store to a paging
structure followed by INVLPG is used by the next access).
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE

ALIAS = 1 << 30           # slot 1 at 1 GiB maps slot 0's host memory


def _aliased(deviations: bool, mmu: str = "shadow") -> tuple[kvmmu.VM, kvmmu.Vcpu, object]:
    vm = kvmmu.VM(mmu=mmu, kvm_deviations=deviations)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=2 << 20)
    hva = vm.memslots.slot(0).userspace_addr
    vm.set_user_memory_region(slot=1, guest_phys_addr=ALIAS, memory_size=2 << 20, userspace_addr=hva)

    def w(gpa: int, value: int) -> None:
        vm.write_phys(gpa, value.to_bytes(8, "little"))
    w(0x1000, 0x2000 | 7), w(0x2000, 0x3000 | 7), w(0x3000, 0x4000 | 7)
    w(0x4000 + 8 * 6, (ALIAS + 0x4000) | 7)        # gva 0x6000: the page table, through the alias gfn
    w(0x4000 + 8 * 7, 0x4000 | 7)                  # gva 0x7000: the page table, through its own gfn
    for page in range(8, 16):
        w(0x4000 + 8 * page, (page << 12) | 7)
        w(page << 12, page * 0x11)
    v = vm.create_vcpu()
    v.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr3=0x1000, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
    return vm, v, w


@pytest.mark.parametrize("deviations", [False, True])
def test_f6_store_to_the_page_table_through_an_alias_is_seen_only_without_kvm_deviations(deviations: bool) -> None:
    vm, v, _ = _aliased(deviations)
    assert v.access(0x8000, 8, "read").value == 0x88
    assert v.access(0x6000 + 8 * 8, 8, "write", 0x9000 | 7).ok       # PTE 8 now maps page 9
    v.invlpg(0x8000)
    got = v.access(0x8000, 8, "read").value
    v.write_cr3(0x1000)
    assert v.access(0x8000, 8, "read").value == got
    assert got == (0x88 if deviations else 0x99)
    vm.audit()


def test_profiles_track_by_gfn_as_kvm_does() -> None:
    """The host profiles stand for a real KVM, so they keep kvm_deviations (and gfn-based tracking)."""
    from kvmmu.kvm.profiles import PROFILES
    assert all(p.kvm_deviations for p in PROFILES.values())


@settings(max_examples=50, deadline=None)
@example(ops=[("read", 8, 8), ("alias-store", 8, 9), ("invlpg", 8, 8), ("read", 8, 8)])
@given(ops=st.lists(st.tuples(st.sampled_from(["store", "alias-store", "read", "invlpg", "cr3"]),
                              st.integers(8, 15), st.integers(8, 15)), min_size=1, max_size=30))
def test_after_invlpg_a_read_follows_the_tables_in_memory(ops: list[tuple[str, int, int]]) -> None:
    """Property (default, SDM): whatever mix of PTE stores through the direct and the alias gfn, after
    INVLPG of a page (or a CR3 load) its next read returns what the guest's tables in memory map."""
    vm, v, _ = _aliased(False)
    fresh: set[int] = set(range(8, 16))       # pages whose translation the guest has invalidated
    for op, page, target in ops:
        if op in ("store", "alias-store"):
            base = 0x6000 if op == "alias-store" else 0x7000
            assert v.access(base + 8 * page, 8, "write", (target << 12) | 7).ok
            fresh.discard(page)
        elif op == "invlpg":
            v.invlpg(page << 12)
            fresh.add(page)
        elif op == "cr3":
            v.write_cr3(0x1000)
            fresh = set(range(8, 16))
        else:
            r = v.access(page << 12, 8, "read")
            if page in fresh:
                pte = int.from_bytes(vm.read_phys(0x4000 + 8 * page, 8), "little")
                assert r.value == int.from_bytes(vm.read_phys(pte & ~0xFFF, 8), "little")
        vm.audit()
