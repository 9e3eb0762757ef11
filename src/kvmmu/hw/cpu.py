"""The modelled CPU of one vCPU while the guest runs: a TLB and the walk of KVM's tables.

Under shadow paging the CPU walks KVM's sptes (never the guest's tables) with CR0.WP=1 and
EFER.NX=1; a miss that the sptes do not allow raises #PF to KVM with the hardware error code,
RSVD included when an MMIO spte (a reserved PA bit) was hit.  The TLB caches what the sptes said:
a guest page-table change is invisible until KVM zaps the spte and flushes, or the guest flushes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch.bits import PFERR_FETCH_MASK, PFERR_IMPLICIT_ACCESS, PFERR_USER_MASK, PFERR_WRITE_MASK
from ..arch.walker import walk

if TYPE_CHECKING:
    from ..kvm.vcpu import Vcpu

_ACCESS_BITS = PFERR_WRITE_MASK | PFERR_USER_MASK | PFERR_FETCH_MASK
# translate() returns (hpa, fault address, error code); a negative hpa says what happened instead.
VM_EXIT = -1        # exit to KVM with (address, error code)
GUEST_FAULT = -2    # an exception went straight to the guest (vcpu.pending_exception)
GP_FAULT = -3       # non-canonical address: #GP


class Cpu:
    __slots__ = ("vcpu", "tlb", "mem", "counters")

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.tlb: dict[int, tuple[int, int, bool, int]] = {}   # vpn -> (host page, ACC, dirty, pkey)
        self.mem = vcpu.vm.host.mem
        self.counters = vcpu.counters

    def flush(self) -> None:
        self.tlb.clear()

    def flush_gva(self, gva: int) -> None:
        self.tlb.pop(gva >> 12, None)

    def translate(self, gva: int, pfec: int) -> tuple[int, int, int]:
        """(host physical address, gva, 0), or (VM_EXIT, gva, #PF error code), or (GP_FAULT, ...)."""
        vcpu = self.vcpu
        mmu = vcpu.mmu
        ctx = mmu.hw_ctx
        vpn = gva >> 12
        entry = self.tlb.get(vpn)
        write = pfec & PFERR_WRITE_MASK
        if entry is not None:
            page, acc, dirty, pkey = entry
            not_smap = vcpu.ac and not pfec & PFERR_IMPLICIT_ACCESS
            idx = ((pfec & _ACCESS_BITS) | (8 if not_smap else 0)) >> 1
            ok = not (ctx.permissions[idx] >> acc) & 1 and (dirty or not write)
            if ok and ctx.pkeys_active and acc & 4 and not pfec & PFERR_FETCH_MASK:
                kbits = (vcpu.pkru >> (2 * pkey)) & 3
                ok = not (kbits & 1 or (kbits & 2 and write))
            if ok:
                self.counters["tlb_hits"] += 1
                return page | (gva & 0xFFF), gva, 0
            del self.tlb[vpn]      # a fault through a TLB entry invalidates it; the CPU re-walks
        self.counters["hw_walks"] += 1
        w = walk(ctx, self.mem, mmu.root_hpa, gva, pfec, ac=vcpu.ac, pkru=vcpu.pkru)
        if w.fault:
            if w.fault == 13:
                return GP_FAULT, gva, 0
            # The real error code cannot say "implicit"; the model tells KVM (docs/ARCHITECTURE.md).
            return VM_EXIT, gva, w.error_code | (pfec & PFERR_IMPLICIT_ACCESS)
        self.tlb[vpn] = (w.gpa & ~0xFFF, w.pte_access, bool(write), w.pkey)
        return w.gpa, gva, 0
