"""Direct MMUs: TDP (EPT/NPT) and shadow paging with guest paging off.

The fault address is a gpa; shadow pages are indexed by gfn; MMIO sptes are installed for gfns
without a slot (on EPT they carry no access bits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...arch.bits import ACC_ALL, PG_LEVEL_2M, PT_PAGE_SIZE_MASK, PT_WRITABLE_MASK
from ...arch.index import gfn_to_gpa, gpa_to_gfn, round_gfn_for_level
from ...arch.walker import Walk
from ...errors import KvmBug
from ..memslots import KVM_MEM_LOG_DIRTY_PAGES
from .hugepage import kvm_mmu_hugepage_adjust
from .install import direct_pte_prefetch, faultin_pfn, get_child_sp, mmu_set_spte
from .pf import RET_PF_CONTINUE, RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS, KvmPageFault
from .shadow_iter import ShadowWalk, for_each_shadow_entry_lockless
from .spte import SPTE_MMU_PRESENT_MASK

if TYPE_CHECKING:
    from .context import VcpuMmu

_FAST_PF_RET: dict[int | None, str] = {RET_PF_SPURIOUS: "SPURIOUS", RET_PF_FIXED: "FIXED"}


def kvm_tdp_page_fault(mmu: VcpuMmu, fault: KvmPageFault) -> int:
    """kvm_tdp_page_fault: the TDP MMU's fault path when the VM has one, else the shadow MMU's."""
    tdp_mmu = mmu.kvm.tdp_mmu
    if tdp_mmu is not None:             # KVM's tdp_mmu_enabled
        return tdp_mmu.page_fault(mmu, fault)
    return direct_page_fault(mmu, fault)


def nonpaging_page_fault(mmu: VcpuMmu, fault: KvmPageFault) -> int:
    """nonpaging_page_fault: shadow paging with guest paging off maps gpas in PAE-format tables,
    whose largest page is 2 MiB."""
    fault.max_level = PG_LEVEL_2M
    return direct_page_fault(mmu, fault)


def nonpaging_gva_to_gpa(mmu: VcpuMmu, gva: int, access: int) -> int | Walk:
    """nonpaging_gva_to_gpa: with guest paging off, a linear address is the physical one."""
    return gva


def direct_page_fault(mmu: VcpuMmu, fault: KvmPageFault) -> int:
    """direct_page_fault: map the gpa of a fault on a direct MMU (the shadow MMU's tables)."""
    kvm = mmu.kvm
    vcpu = mmu.vcpu
    fault.gfn = gpa_to_gfn(fault.addr)
    fault.slot = vcpu.gfn_to_memslot(fault.gfn)
    if not fault.rsvd and fault.present and fault.write and kvm.is_write_tracked(fault.gfn):
        return RET_PF_EMULATE
    r = fast_page_fault(mmu, fault)
    if r is not None:
        return r
    kvm.make_mmu_pages_available()
    r = faultin_pfn(mmu, fault, ACC_ALL)
    if r != RET_PF_CONTINUE:
        return r
    if not mmu.root_valid:
        return RET_PF_RETRY
    return direct_map(mmu, fault)


def fast_page_fault(mmu: VcpuMmu, fault: KvmPageFault) -> int | None:
    """Without the MMU lock, make a write-protected (dirty-logged) spte writable again.

    Only a write fault on a present leaf that KVM itself may make writable (MMU-writable set)
    qualifies; never an RSVD fault.  Counts pf_fast.  Once page_fault_can_be_fast lets a fault in,
    KVM traces fast_page_fault whatever the outcome (spurious, fixed, or neither: the slow path).
    """
    if fault.rsvd or not fault.present or not fault.write or not mmu.root_hpa:
        return None
    last = None
    for it, spte in for_each_shadow_entry_lockless(mmu, gfn_to_gpa(fault.gfn)):
        last = (it.sptep, spte)
        if not spte & SPTE_MMU_PRESENT_MASK:
            break
        if it.level == 1 or spte & PT_PAGE_SIZE_MASK:
            return fast_pf_fix_leaf(mmu, fault, it.sptep, spte, it.level)
    if last is not None:
        trace_fast_page_fault(mmu, fault, last[0], last[1], None)
    return None


def trace_fast_page_fault(mmu: VcpuMmu, fault: KvmPageFault, sptep: int, old_spte: int, ret: int | None) -> None:
    """trace_fast_page_fault: the spte before and as it is now; ret None is RET_PF_INVALID."""
    mmu.vm.trace.emit("fast_page_fault", vcpu_id=mmu.vcpu.id, cr2_or_gpa=fault.addr,
                      error_code=fault.error_code, sptep=sptep, old_spte=old_spte,
                      new_spte=mmu.kvm.read_spte(sptep),
                      ret=_FAST_PF_RET.get(ret, "INVALID"))


def fast_pf_fix_leaf(mmu: VcpuMmu, fault: KvmPageFault, sptep: int, spte: int, level: int) -> int | None:
    """The lockless fix of a present leaf (fast_pf_fix_direct_spte), or None for the slow path."""
    m = mmu.masks
    if spte & PT_WRITABLE_MASK:
        mmu.vcpu.stats["pf_fast"] += 1
        trace_fast_page_fault(mmu, fault, sptep, spte, RET_PF_SPURIOUS)
        return RET_PF_SPURIOUS
    if not spte & m.mmu_writable or (level > 1 and fault.slot is not None
                                     and fault.slot.flags & KVM_MEM_LOG_DIRTY_PAGES):
        # Not MMU-writable: only the slow path may write-enable it.  A large spte of a dirty-logged
        # slot: fast_page_fault marks one gfn dirty, so making it writable would let writes to its
        # other 511 (or 262,143) pages go unlogged; the slow path maps a 4 KiB spte.
        trace_fast_page_fault(mmu, fault, sptep, spte, None)
        return None
    mmu.kvm.write_spte(sptep, spte | 2 | m.dirty)
    if fault.slot is not None:
        mmu.vm.mark_page_dirty(fault.slot, fault.gfn)
    mmu.vcpu.stats["pf_fast"] += 1
    if mmu.vm.trace.enabled:
        trace_fast_page_fault(mmu, fault, sptep, spte, RET_PF_FIXED)
    return RET_PF_FIXED


def direct_map(mmu: VcpuMmu, fault: KvmPageFault) -> int:
    kvm = mmu.kvm
    kvm_mmu_hugepage_adjust(mmu, fault)
    goal = fault.goal_level
    it = ShadowWalk(mmu, gfn_to_gpa(fault.gfn))
    if not it.okay():
        return RET_PF_RETRY             # no shadow page behind the PAE root's entry
    while it.level > goal:
        sptep = it.sptep
        base_gfn = round_gfn_for_level(fault.gfn, it.level)
        child, linked = get_child_sp(mmu, sptep, base_gfn, True, ACC_ALL)
        if not linked:
            kvm.link_shadow_page(sptep, child)
        it.next_okay()
    if it.level != goal:
        raise KvmBug(f"direct_map for gfn {fault.gfn:#x} ended at level {it.level}, not {goal}")
    sptep = it.sptep
    gfn = round_gfn_for_level(fault.gfn, goal)
    ret = mmu_set_spte(mmu, fault.slot, sptep, ACC_ALL, gfn, fault.pfn, fault, host_writable=fault.map_writable)
    if ret != RET_PF_SPURIOUS:
        direct_pte_prefetch(mmu, sptep)
    return ret
