"""KVM's MMU-notifier callbacks (virt/kvm/kvm_main.c's kvm_mmu_notifier_*), for one host page.

The host's memory management calls them through the notifier each VM registers with it
(`Host.register_mmu_notifier`, hw/host.py's `MmuNotifier`): when a page is about to be unmapped
(COW of the zero page, swap-out) and when reclaim asks whether a page was used lately.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .vm import VM


def _hva_to_gfns(vm: VM, hva: int) -> list[tuple[int, int]]:
    """(as_id, gfn) of every memslot of `vm` that maps host page `hva` (hva_to_gfn_memslot)."""
    out = []
    for slot in vm.memslots.all_slots():
        start = slot.userspace_addr
        if start <= hva < start + (slot.npages << 12) and not slot.invalid:
            out.append((slot.as_id, slot.base_gfn + ((hva - start) >> 12)))
    return out


def kvm_unmap_hva(vm: VM, hva: int) -> bool:
    """kvm_mmu_notifier_invalidate_range_start -> kvm_unmap_gfn_range for one host page: drop every
    leaf spte mapping it (shadow pages of the gfn stay), then flush remote TLBs.  True if any was dropped."""
    mmu = vm.mmu
    dropped = False
    for as_id, gfn in _hva_to_gfns(vm, hva):
        for sptep in mmu.gfn_leaf_sptes(as_id, gfn):
            mmu.drop_spte(sptep)
            dropped = True
        if mmu.tdp_mmu is not None:
            dropped |= mmu.tdp_mmu.unmap_gfn_range(as_id, gfn, gfn + 1)     # kvm_tdp_mmu_unmap_gfn_range
    if dropped:
        vm.trace.emit("host_unmap", start=hva & ~0xFFF, end=(hva & ~0xFFF) + 0x1000)
        mmu.flush_remote_tlbs()
    return dropped


def kvm_age_hva(vm: VM, hva: int) -> bool:
    """kvm_mmu_notifier_clear_young -> kvm_age_gfn: True if an spte mapping the page has its accessed
    bit set; the bit is cleared.  (No flush, as in KVM: a TLB entry may hide the next access.)"""
    mmu = vm.mmu
    abit = mmu.masks.accessed
    if not abit:
        return False
    young = False
    for as_id, gfn in _hva_to_gfns(vm, hva):
        for sptep in mmu.gfn_leaf_sptes(as_id, gfn):
            spte = mmu.read_spte(sptep)
            if spte & abit:
                mmu.write_spte(sptep, spte & ~abit)
                young = True
        if mmu.tdp_mmu is not None:
            young |= mmu.tdp_mmu.age_gfn_range(as_id, gfn, gfn + 1)         # kvm_tdp_mmu_age_gfn_range
    return young


class KvmMmuNotifier:
    """The notifier a VM registers with its host (kvm_init_mmu_notifier): hw/host.py's MmuNotifier."""

    __slots__ = ("vm",)

    def __init__(self, vm: VM) -> None:
        self.vm = vm

    def invalidate_range(self, start: int, end: int) -> bool:
        dropped = False
        for hva in range(start & ~0xFFF, end, 0x1000):
            dropped |= kvm_unmap_hva(self.vm, hva)
        return dropped

    def clear_young(self, start: int, end: int) -> bool:
        young = False
        for hva in range(start & ~0xFFF, end, 0x1000):
            young |= kvm_age_hva(self.vm, hva)
        return young


__all__ = ["KvmMmuNotifier", "kvm_age_hva", "kvm_unmap_hva"]
