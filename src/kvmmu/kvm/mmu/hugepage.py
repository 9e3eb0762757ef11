"""Huge sptes: the level a fault may map (kvm_mmu_hugepage_adjust) and what forbids a level.

One implementation for every fault path (the shadow MMU's FNAME(fetch), the direct MMU of TDP and
of shadow paging with guest paging off).  A level is allowed for a gfn when the guest's own mapping
is at least that large (`fault.max_level`: the guest walk's level under shadow paging), the memslot
holds the whole huge frame with gfn and host address congruent, no gfn in the frame is shadowed
(a guest page table must stay write-protected at 4 KiB), the slot is not dirty-logged, and the host
backs the memory with pages at least that large (`VM(host_hugepage_level=...)`, KVM's
host_pfn_mapping_level).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...arch.bits import PG_LEVEL_1G, PG_LEVEL_4K
from ...arch.index import pages_per_hpage
from ..memslots import KVM_MEM_LOG_DIRTY_PAGES, Memslot
from .pf import KVM_PFN_ERR_RO_FAULT, KVM_PFN_NOSLOT, KvmPageFault

if TYPE_CHECKING:
    from .context import VcpuMmu
    from .mmu import KvmMmu

KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G


def lpage_index(gfn: int, level: int) -> int:
    """Which huge frame of `level` holds gfn (gfn_to_index without the slot's base)."""
    return gfn >> (9 * (level - 1))


def lpage_disallowed(kvm: KvmMmu, slot: Memslot, gfn: int, level: int) -> bool:
    """lpage_info_slot(gfn, slot, level)->disallow_lpage: set by kvm_alloc_memslot_metadata for a
    frame the slot does not wholly hold or whose host address is not congruent with its gfn, and
    counted up by kvm_mmu_gfn_disallow_lpage for each shadowed guest page table in the frame."""
    pages = pages_per_hpage(level)
    base = gfn & ~(pages - 1)
    if base < slot.base_gfn or base + pages > slot.end_gfn:
        return True
    if ((slot.userspace_addr >> 12) ^ slot.base_gfn) & (pages - 1):
        return True
    return (slot.as_id, level, lpage_index(gfn, level)) in kvm.disallow_lpage


def max_mapping_level(mmu: VcpuMmu, slot: Memslot, gfn: int, max_level: int) -> int:
    """__kvm_mmu_max_mapping_level: the largest allowed level not above max_level, capped by the
    host's mapping level."""
    level = min(max_level, KVM_MAX_HUGEPAGE_LEVEL)
    while level > PG_LEVEL_4K and lpage_disallowed(mmu.kvm, slot, gfn, level):
        level -= 1
    if level == PG_LEVEL_4K:
        return PG_LEVEL_4K
    return min(mmu.vm.host_hugepage_level, level)


def kvm_mmu_hugepage_adjust(mmu: VcpuMmu, fault: KvmPageFault) -> None:
    """Sets fault.goal_level (and rounds fault.pfn down to the huge frame) for a resolved fault.

    Call it after the indirect levels are linked (FNAME(fetch) does): linking may shadow a gfn of
    the frame, which forbids the huge page."""
    fault.goal_level = PG_LEVEL_4K
    slot = fault.slot
    if fault.max_level == PG_LEVEL_4K or slot is None or fault.pfn in (KVM_PFN_NOSLOT, KVM_PFN_ERR_RO_FAULT):
        return
    if slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
        return                          # kvm_slot_dirty_track_enabled: dirty pages are tracked at 4 KiB
    level = max_mapping_level(mmu, slot, fault.gfn, fault.max_level)
    if level > PG_LEVEL_4K:
        level = mmu.vm.host.mapping_level(fault.pfn, level)
    if level == PG_LEVEL_4K:
        return
    fault.goal_level = level
    fault.pfn &= ~(pages_per_hpage(level) - 1)


__all__ = ["KVM_MAX_HUGEPAGE_LEVEL", "kvm_mmu_hugepage_adjust", "lpage_disallowed", "lpage_index",
           "max_mapping_level", "pages_per_hpage"]
