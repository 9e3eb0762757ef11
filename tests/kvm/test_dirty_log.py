"""Dirty logging never loses a write (issue 15, F5): huge sptes, fast_page_fault and re-arming.

KVM logs dirty pages at 4 KiB: kvm_mmu_hugepage_adjust maps 4 KiB in a dirty-logged slot,
fast_page_fault refuses to make a large spte writable there, and write protection on enabling the log
and on KVM_GET_DIRTY_LOG covers every level (kvm_mmu_slot_remove_write_access from PG_LEVEL_4K,
kvm_mmu_slot_gfn_write_protect).  The promise checked here: every gfn the guest wrote while logging
was on is in the next KVM_GET_DIRTY_LOG.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvmmu
from kvmmu.arch.bits import X86_CR0_PE

SLOT_GPA = 1 << 30          # 1 GiB aligned, so every host huge-page size fits
LOG = 1                     # KVM_MEM_LOG_DIRTY_PAGES


def _vm(mmu: str, level: int, npages: int, tdp_mmu: bool = True) -> tuple[kvmmu.VM, kvmmu.Vcpu]:
    """Guest paging off (gva = gpa), one data slot at 1 GiB backed by host huge pages of `level`."""
    vm = kvmmu.VM(mmu=mmu, host_hugepage_level=level, tdp_mmu=tdp_mmu if mmu != "shadow" else None)
    vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT_GPA, memory_size=npages << 12)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PE, cr3=0, cr4=0, efer=0)
    return vm, vcpu


def _log(vm: kvmmu.VM, npages: int, on: bool) -> None:
    vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT_GPA, memory_size=npages << 12, flags=LOG if on else 0)


@pytest.mark.parametrize("mmu", ["ept", "npt"])
def test_f5_writes_to_one_2m_page_are_all_logged(mmu: str) -> None:
    """The minimised report: a 2 MiB spte exists, logging is switched on, the guest writes three 4 KiB
    pages of it; all three are dirty (the model reported only the first)."""
    vm, v = _vm(mmu, 2, 512)
    v.access(SLOT_GPA, 4, "write", 1)
    assert vm.stats["pages_2m"] == 1
    _log(vm, 512, True)
    for off in (0, 0x1000, 0x1FF000):
        v.access(SLOT_GPA + off, 4, "write", 2)
    assert vm.get_dirty_log(1) == {0, 1, 0x1FF}
    for off in (0x2000, 0x1FE000):
        v.access(SLOT_GPA + off, 4, "write", 3)
    assert vm.get_dirty_log(1) == {2, 0x1FE}
    vm.audit()


def test_f5_a_1g_spte_is_split_on_the_first_logged_write() -> None:
    """A 1 GiB spte made while logging was off: the first logged write goes to the slow path, which maps
    that page at 4 KiB; a write to a page 1023 MiB further is still logged."""
    vm, v = _vm("ept", 3, 1 << 18)
    v.access(SLOT_GPA + 0x5000, 8, "read")
    assert vm.stats["pages_1g"] == 1
    _log(vm, 1 << 18, True)
    v.access(SLOT_GPA + 0x5000, 8, "write", 1)
    v.access(SLOT_GPA + (1023 << 20), 8, "write", 1)
    assert vm.get_dirty_log(1) == {5, 1023 << 8}
    assert vm.stats["pages_1g"] == 0
    vm.audit()


@pytest.mark.parametrize("tdp_mmu", [False, True], ids=["legacy", "tdp_mmu"])
def test_write_protect_gfn_reaches_a_huge_spte_from_any_of_its_gfns(tdp_mmu: bool) -> None:
    """kvm_mmu_slot_gfn_write_protect (the rmap walk, or kvm_tdp_mmu_write_protect_gfn): any gfn
    inside a 2 MiB spte write-protects that spte."""
    vm, v = _vm("ept", 2, 512, tdp_mmu)
    v.access(SLOT_GPA, 4, "write", 1)

    def leaf() -> tuple[int, int]:
        if tdp_mmu:
            return vm.mmu.tdp_mmu.get_walk(v.mmu, SLOT_GPA + 0x123000)[-1]
        (sptep,) = vm.mmu.gfn_leaf_sptes(0, (SLOT_GPA >> 12) + 0x123)
        return 2, vm.host.mem.read(sptep, 8)
    level, spte = leaf()
    assert level == 2 and spte & 0x80 and spte & 2
    assert vm.mmu.write_protect_gfn((SLOT_GPA >> 12) + 0x123, 0, for_dirty_log=True)
    assert not leaf()[1] & 2


# Pages: 0-3 in the first 2 MiB, then one in each of the next 2 MiB ranges, and one 1 GiB - 4 KiB in.
_PAGES = (0, 1, 2, 0x1FF, 0x200, 0x3FF, 0x400, (1 << 18) - 1)
_PAGE = st.sampled_from(_PAGES)
_OP = st.one_of(
    st.tuples(st.just("write"), _PAGE),
    st.tuples(st.just("read"), _PAGE),
    st.tuples(st.just("log"), st.booleans()),
    st.tuples(st.just("get"), st.just(0)),
    st.tuples(st.just("swap"), _PAGE),
)


@settings(max_examples=80, deadline=None)
@example(mmu="npt", level=2, ops=[("read", 0), ("log", True), ("write", 1), ("write", 2), ("get", 0)])
@given(mmu=st.sampled_from(["shadow", "ept", "npt"]), level=st.sampled_from([1, 2, 3]),
       ops=st.lists(_OP, min_size=1, max_size=40))
def test_dirty_log_contains_every_written_gfn(mmu: str, level: int, ops: list[tuple[str, object]]) -> None:
    """Property: over any sequence of guest reads/writes (pages that share or do not share a 2 MiB or
    1 GiB host page), logging switched on and off, host swap-outs and KVM_GET_DIRTY_LOG
    calls, each KVM_GET_DIRTY_LOG returns a superset of the pages written since the previous one while
    logging was on; audit holds after every step."""
    npages = 1 << 18
    vm, v = _vm(mmu, level, npages)
    logging, written = False, set()
    for op, arg in ops:
        page = arg if type(arg) is int else 0
        if op == "write":
            v.access(SLOT_GPA + (page << 12) + 8, 8, "write", page)
            if logging:
                written.add(page)
        elif op == "read":
            v.access(SLOT_GPA + (page << 12), 8, "read")
        elif op == "log" and arg != logging:
            _log(vm, npages, bool(arg))
            logging, written = bool(arg), set()
        elif op == "get" and logging:
            got = vm.get_dirty_log(1)
            assert written <= got, f"writes to pages {sorted(written - got)} missing from the dirty log"
            written = set()
        elif op == "swap":
            vm.host.swap_out_pages([(vm.memslots.slot(1).userspace_addr >> 12) + page])
        vm.audit()
    if logging:
        assert written <= vm.get_dirty_log(1)
