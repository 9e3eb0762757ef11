"""`struct kvm_page_fault` and the RET_PF_* results every fault handler returns."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...arch.bits import (
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
)

RET_PF_CONTINUE = 0
RET_PF_RETRY = 1
RET_PF_EMULATE = 2
RET_PF_WRITE_PROTECTED = 3
RET_PF_INVALID = 4
RET_PF_FIXED = 5
RET_PF_SPURIOUS = 6
RET_PF_NAMES = ("CONTINUE", "RETRY", "EMULATE", "WRITE_PROTECTED", "INVALID", "FIXED", "SPURIOUS")

if TYPE_CHECKING:
    from ..memslots import Memslot

KVM_PFN_NOSLOT = 1 << 63
KVM_PFN_ERR_RO_FAULT = (0x7FF << 52) | 2


class KvmPageFault:
    __slots__ = ("addr", "error_code", "prefetch", "exec", "write", "present", "rsvd", "user", "is_tdp",
                 "gfn", "slot", "pfn", "map_writable", "max_level", "goal_level", "hva", "nested")

    def __init__(self, addr: int, error_code: int, is_tdp: bool, prefetch: bool = False) -> None:
        self.addr = addr
        self.error_code = error_code
        self.prefetch = prefetch
        self.exec = bool(error_code & PFERR_FETCH_MASK)
        self.write = bool(error_code & PFERR_WRITE_MASK)
        self.present = bool(error_code & PFERR_PRESENT_MASK)
        self.rsvd = bool(error_code & PFERR_RSVD_MASK)
        self.user = bool(error_code & PFERR_USER_MASK)
        self.is_tdp = is_tdp
        self.gfn = 0
        self.slot: Memslot | None = None
        self.pfn = 0
        self.map_writable = False
        self.max_level = 3
        self.goal_level = 1
        self.hva = 0
        self.nested = False
