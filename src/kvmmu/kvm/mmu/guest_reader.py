"""How KVM reads the guest's page tables: through memslots, one gfn->hva lookup per gpte.

This is the cost the 2011 discussion is about ("walking guest page table is slower, it needs to walk
memslots many times"); every read and A/D write is counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..memslots import KVM_MEMSLOT_INVALID

if TYPE_CHECKING:
    from ..memslots import Memslot
    from ..vcpu import Vcpu


class GuestPteReader:
    """A page-walker reader over guest-physical memory, as seen by one vCPU."""

    __slots__ = ("vcpu", "vm", "counters", "memslots", "mem", "hint", "as_id")

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.vm = vcpu.vm
        self.counters = vcpu.counters
        self.memslots = vcpu.vm.memslots
        self.mem = vcpu.vm.host.mem
        self.hint = vcpu.last_used_slot
        self.as_id = 0

    def _slot(self, gpa: int) -> Memslot | None:
        """The counted memslot lookup for one gpte (None: no usable slot)."""
        c = self.counters
        c["memslot_lookups"] += 1
        ms = self.memslots
        gfn = gpa >> 12
        last = self.hint[0]
        # Memslots.gfn_to_memslot's last-used-slot hit, inlined (one per gpte read): same counts.
        if last is not None and last.base_gfn <= gfn < last.base_gfn + last.npages \
                and ms.spaces[self.as_id].by_id.get(last.id) is last:
            ms.lookups += 1
            return None if last.flags & KVM_MEMSLOT_INVALID else last
        before = ms.searches
        slot = ms.gfn_to_memslot(gfn, self.as_id, self.hint)
        c["memslot_searches"] += ms.searches - before
        return None if slot is None or slot.invalid else slot

    def _hva(self, gpa: int, write: bool) -> int:
        slot = self._slot(gpa)
        if slot is None:
            return -1
        if write and slot.readonly:
            return -2
        hva = slot.gfn_to_hva(gpa >> 12) | (gpa & 0xFFF)
        if write:
            self.vm.mark_page_dirty(slot, gpa >> 12)
        self.vm.host_touch(hva, write)
        return hva

    def read_pte(self, gpa: int, size: int) -> int:
        self.counters["guest_pte_reads"] += 1
        slot = self._slot(gpa)            # _hva(gpa, False), inlined: one per gpte of every guest walk
        if slot is None:
            return -1
        hva = slot.gfn_to_hva(gpa >> 12) | (gpa & 0xFFF)
        self.vm.host_touch(hva, False)
        return self.mem.read(hva, size)

    def read_pte_atomic(self, gpa: int, size: int) -> int:
        """kvm_vcpu_read_guest_atomic, as KVM reads gptes under mmu_lock (FNAME(sync_spte)): a host
        page that is not resident is a failed read (-1), never a swap-in, so no MMU notifier can
        run in the middle of the caller."""
        self.counters["guest_pte_reads"] += 1
        slot = self._slot(gpa)
        if slot is None:
            return -1
        hva = slot.gfn_to_hva(gpa >> 12) | (gpa & 0xFFF)
        if not self.vm.host_resident(hva):
            return -1
        return self.mem.read(hva, size)

    def cmpxchg_pte(self, gpa: int, size: int, old: int, new: int) -> bool:
        hva = self._hva(gpa, True)
        if hva == -2:
            return True          # tables in a read-only slot keep their A/D bits unchanged
        if hva < 0:
            return True
        return self.mem.cmpxchg_pte(hva, size, old, new)
