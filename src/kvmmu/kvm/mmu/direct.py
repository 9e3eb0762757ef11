"""Direct MMUs: TDP (EPT/NPT) and shadow paging with guest paging off.

The fault address is a gpa; shadow pages are indexed by gfn; MMIO sptes are installed for gfns
without a slot (on EPT they carry no access bits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .install import direct_pte_prefetch, faultin_pfn, get_child_sp, mmu_set_spte
from .pf import RET_PF_CONTINUE, RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS, KvmPageFault
from .spte import SPTE_MMU_PRESENT_MASK

if TYPE_CHECKING:
    from .context import VcpuMmu

ACC_ALL = 7


def direct_page_fault(mmu: VcpuMmu, fault: KvmPageFault) -> int:
    kvm = mmu.kvm
    vcpu = mmu.vcpu
    fault.gfn = fault.addr >> 12
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
    qualifies; never an RSVD fault.  Counts pf_fast.
    """
    if fault.rsvd or not fault.present or not fault.write or not mmu.root_hpa:
        return None
    kvm = mmu.kvm
    for level, sptep in mmu.shadow_walk_ptrs(fault.gfn << 12):
        spte = kvm.read_spte(sptep)
        if not spte & SPTE_MMU_PRESENT_MASK:
            return None
        if level == 1 or spte & 0x80:
            return fast_pf_fix_leaf(mmu, fault, sptep, spte)
    return None


def fast_pf_fix_leaf(mmu: VcpuMmu, fault: KvmPageFault, sptep: int, spte: int) -> int | None:
    """The lockless fix of a present leaf (fast_pf_fix_direct_spte), or None for the slow path."""
    m = mmu.masks
    if spte & 2:
        mmu.vcpu.stats["pf_fast"] += 1
        return RET_PF_SPURIOUS
    if not spte & m.mmu_writable:
        return None
    mmu.kvm.write_spte(sptep, spte | 2 | m.dirty)
    if fault.slot is not None:
        mmu.vm.mark_page_dirty(fault.slot, fault.gfn)
    mmu.vcpu.stats["pf_fast"] += 1
    mmu.vm.trace.emit("fast_page_fault", gfn=fault.gfn, old=spte, new=spte | 2 | m.dirty)
    return RET_PF_FIXED


def _hugepage_level(mmu: VcpuMmu, fault: KvmPageFault) -> int:
    """kvm_mmu_hugepage_adjust: the largest level the slot alignment and host backing allow."""
    vm = mmu.vm
    slot = fault.slot
    if slot is None or not vm.tdp_enabled or slot.flags & 1:
        return 1
    level = 1
    for lvl in (2, 3):
        if lvl > min(fault.max_level, vm.host_hugepage_level):
            break
        pages = 1 << (9 * (lvl - 1))
        base = fault.gfn & ~(pages - 1)
        if base < slot.base_gfn or base + pages > slot.end_gfn:
            break
        if (slot.userspace_addr >> 12) % pages != slot.base_gfn % pages:
            break                               # gfn and hva not congruent: no host huge page fits
        level = lvl
    return level


def direct_map(mmu: VcpuMmu, fault: KvmPageFault) -> int:
    kvm = mmu.kvm
    addr = fault.gfn << 12
    goal = _hugepage_level(mmu, fault)
    fault.goal_level = goal
    if mmu.root_level == 3:
        sp = mmu.pae_sps[(addr >> 30) & 3]
        if sp is None:
            return RET_PF_RETRY
        table, level = sp.hpa, 2
    else:
        table, level = mmu.root_hpa, mmu.root_level
    while level > goal:
        sptep = table + 8 * ((addr >> (12 + 9 * (level - 1))) & 511)
        base_gfn = fault.gfn & ~((1 << (9 * (level - 1))) - 1)
        child, linked = get_child_sp(mmu, sptep, base_gfn, True, ACC_ALL)
        if not linked:
            kvm.link_shadow_page(sptep, child)
        table = child.hpa
        level -= 1
    sptep = table + 8 * ((addr >> (12 + 9 * (goal - 1))) & 511)
    gfn = fault.gfn & ~((1 << (9 * (goal - 1))) - 1)
    pfn = fault.pfn & ~((1 << (9 * (goal - 1))) - 1) if fault.slot is not None else fault.pfn
    ret = mmu_set_spte(mmu, fault.slot, sptep, ACC_ALL, gfn, pfn, fault, host_writable=fault.map_writable)
    if ret != RET_PF_SPURIOUS:
        direct_pte_prefetch(mmu, sptep)
    return ret
