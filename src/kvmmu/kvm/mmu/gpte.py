"""The format of the guest's page-table entries that an indirect MMU shadows.

KVM compiles paging_tmpl.h three times (paging32, paging64, ept); the model keeps one walker and
describes the three gpte formats as data: entry size, present test, how rights map to ACC_* bits,
and where A/D live.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...arch.bits import PT32_ADDR_MASK, PT64_ADDR_MASK
from ...arch.modes import PagingContext

# EPT R/W/X (bits 0/1/2) -> ACC_* (exec 1, write 2, user 4): KVM reuses ACC_USER for "readable".
EPT_TO_ACC = tuple(((rwx >> 2) & 1) | (rwx & 2) | ((rwx & 1) << 2) for rwx in range(8))


@dataclass(frozen=True)
class GuestFormat:
    name: str
    esize: int
    addr_mask: int
    accessed: int          # 0 when the format has no A bit (EPT without A/D)
    dirty: int
    ept: bool
    has_nx: bool
    ctx: PagingContext

    def present(self, gpte: int) -> bool:
        return bool(gpte & 7) if self.ept else bool(gpte & 1)

    def access(self, gpte: int) -> int:
        if self.ept:
            return EPT_TO_ACC[gpte & 7]
        return (gpte & 6) | ((1 ^ (gpte >> 63)) if self.has_nx else 1)

    def gfn(self, gpte: int) -> int:
        return (gpte & self.addr_mask) >> 12

    def rsvd_leaf(self, gpte: int) -> bool:
        ctx = self.ctx
        if gpte & ctx.rsvd[0][1]:
            return True
        return bool(self.ept and (ctx.bad_mt_xwr >> (gpte & 0x3F)) & 1)


def guest_format(ctx: PagingContext) -> GuestFormat:
    mode = ctx.mode
    if mode.ept:
        ad = ctx.ept_ad
        return GuestFormat("ept", 8, PT64_ADDR_MASK, 1 << 8 if ad else 0, 1 << 9 if ad else 0, True, False, ctx)
    if mode.entry_size == 4:
        return GuestFormat("paging32", 4, PT32_ADDR_MASK, 1 << 5, 1 << 6, False, False, ctx)
    return GuestFormat("paging64", 8, PT64_ADDR_MASK, 1 << 5, 1 << 6, False, mode.has_nx, ctx)
