"""The per-vCPU MMIO cache (vcpu->arch.mmio_gva/mmio_gfn/mmio_access/mmio_gen, x86.h).

It belongs to the vCPU, not to one `kvm_mmu`: KVM keeps it in vcpu->arch, so switching between
root_mmu and guest_mmu (nested entry/exit) keeps it, and only the explicit clears below empty it.
A gva (or gfn) of 0 means "nothing cached", which is why MMIO at page 0 never hits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..memslots import KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS

if TYPE_CHECKING:
    from ..vcpu import Vcpu

MMIO_GVA_ANY = ~0


class MmioCache:
    """One vCPU's last MMIO translation, with KVM's vcpu_*_mmio_* helpers as methods."""

    __slots__ = ("vcpu", "vm", "mmio_gva", "mmio_gfn", "mmio_access", "mmio_gen")

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.vm = vcpu.vm
        self.mmio_gva = 0
        self.mmio_gfn = 0
        self.mmio_access = 0
        self.mmio_gen = 0

    def cache(self, gva: int, gfn: int, access: int) -> None:
        """vcpu_cache_mmio_info."""
        gen = self.vm.memslots.generation(0)
        if gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
            return                      # never cache a translation built from a set being replaced
        # vcpu_cache_mmio_info tests mmu_is_nested too: L2's "gva" is an ngpa, not worth caching.
        self.mmio_gva = 0 if self.vcpu.mmu_is_nested else gva & ~0xFFF
        self.mmio_access = access
        self.mmio_gfn = gfn
        self.mmio_gen = gen

    def clear(self, gva: int) -> None:
        """vcpu_clear_mmio_info: only the gva goes; gfn, access and generation stay."""
        if gva == MMIO_GVA_ANY or self.mmio_gva == gva & ~0xFFF:
            self.mmio_gva = 0

    def match_gen(self) -> bool:
        """vcpu_match_mmio_gen."""
        vm = self.vm
        if vm.mmio_caching == "zap":
            return True                 # the 2011 cache had no generation (added in 2014)
        return self.mmio_gen == vm.memslots.spaces[0].generation

    def match_gva(self, gva: int) -> bool:
        """vcpu_match_mmio_gva."""
        mmio_gva = self.mmio_gva
        return bool(mmio_gva) and mmio_gva == gva & ~0xFFF and self.match_gen()

    def match_gpa(self, gpa: int) -> bool:
        """vcpu_match_mmio_gpa."""
        mmio_gfn = self.mmio_gfn
        return bool(mmio_gfn) and mmio_gfn == gpa >> 12 and self.match_gen()

    def info_in_cache(self, addr: int, direct: bool) -> bool:
        """mmio_info_in_cache.  A nested guest's fault address is an L2 gpa: the cache (L1 gva/gfn)
        must not answer it (KVM's mmio_info_in_cache tests mmu_is_nested the same way)."""
        if self.vcpu.mmu_is_nested:
            return False
        if direct:
            return self.match_gpa(addr)
        return self.match_gva(addr)
