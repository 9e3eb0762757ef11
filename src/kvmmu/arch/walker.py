"""The one page walker: every paging mode (32-bit, PAE, 4-level, 5-level, EPT) runs through `walk`.

The walker reads paging-structure entries through a *reader* (anything with `read_pte(addr, size)`
returning the entry or -1 when nothing backs that address, and `cmpxchg_pte(addr, size, old, new)`),
so the modelled CPU (reading host memory) and KVM's software walker (reading guest memory through
memslots, counting what that costs) share this code, as KVM shares `paging_tmpl.h`.

A/D policy (`PagingContext.ad_policy`):
- "kvm": A and D are written only after the whole walk, permission checks included, succeeded
  (KVM's `update_accessed_dirty_bits`, measured on the real /dev/kvm: no A bit on a faulting walk);
- "hardware": A is set on each non-leaf entry as the CPU passes through it, so a walk that faults
  further down leaves A set above; the leaf gets A (and D) only when the access is allowed.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import InvalidArgument
from .bits import (
    EPT_VIOLATION_ACC_INSTR,
    EPT_VIOLATION_ACC_READ,
    EPT_VIOLATION_ACC_WRITE,
    EXIT_REASON_EPT_MISCONFIG,
    EXIT_REASON_EPT_VIOLATION,
    GP_VECTOR,
    PF_VECTOR,
    PFERR_FETCH_MASK,
    PFERR_IMPLICIT_ACCESS,
    PFERR_PK_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    PT32_DIR_PSE36_MASK,
    PT64_ADDR_MASK,
    VMX_EPT_ACCESS_BIT,
    VMX_EPT_DIRTY_BIT,
)
from .modes import PagingContext

ACCESSED = 1 << 5
DIRTY = 1 << 6
_ACCESS_BITS = PFERR_WRITE_MASK | PFERR_USER_MASK | PFERR_FETCH_MASK
_MAX_RESTARTS = 8


class PteReader(Protocol):
    def read_pte(self, addr: int, size: int) -> int: ...
    def cmpxchg_pte(self, addr: int, size: int, old: int, new: int) -> bool: ...


class Walk:
    """The outcome of one walk (KVM's `struct guest_walker`, plus the fault it produced).

    fault: 0 (translated), PF_VECTOR (#PF, error_code = PFEC), GP_VECTOR (non-canonical address),
    EXIT_REASON_EPT_VIOLATION (error_code = exit qualification) or EXIT_REASON_EPT_MISCONFIG.
    pte_access: what the whole translation allows, as ACC_* bits (exec 1, write 2, user 4); for EPT
    the raw R/W/X bits (1/2/4).  Per-level lists are indexed by level (1 = 4 KiB table).
    """

    __slots__ = ("addr", "access", "fault", "error_code", "gpa", "level", "pte_access", "pkey",
                 "ptes", "pte_addrs", "pt_access", "table_gfns", "root_level")

    def __init__(self, addr: int, access: int, root_level: int) -> None:
        self.addr = addr
        self.access = access
        self.fault = 0
        self.error_code = 0
        self.gpa = -1
        self.level = 0
        self.pte_access = 0
        self.pkey = 0
        self.root_level = root_level
        self.ptes = [0] * 6
        self.pte_addrs = [-1] * 6
        self.pt_access = [0] * 6
        self.table_gfns = [0] * 6

    @property
    def ok(self) -> bool:
        return self.fault == 0

    @property
    def gfn(self) -> int:
        return self.gpa >> 12

    def __repr__(self) -> str:
        if self.fault:
            return f"Walk({self.addr:#x}: fault {self.fault} code {self.error_code:#x} at level {self.level})"
        return f"Walk({self.addr:#x} -> {self.gpa:#x}, level {self.level}, access {self.pte_access:#o})"


def canonical(addr: int, bits: int) -> bool:
    top = addr >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def walk(ctx: PagingContext, mem: PteReader, root: int, addr: int, access: int = 0, *,
         ac: bool = False, pkru: int = 0, pdptrs: tuple[int, ...] | None = None) -> Walk:
    """Translate `addr` for an access described by PFERR_* bits (W, U, F, IMPLICIT).

    root is CR3 (or the EPTP); `ac` is EFLAGS.AC; `pkru` the PKRU register; `pdptrs` the PAE PDPTEs
    cached at the last CR3 load (None: read them from memory).
    """
    mode = ctx.mode
    w = Walk(addr, access, mode.root_level)
    if addr < 0:
        raise InvalidArgument("address", addr, "addresses are unsigned")
    bits = mode.la_bits
    if bits > 32:
        if addr >> 64 or not canonical(addr, bits):
            w.fault = GP_VECTOR          # SDM: a non-canonical linear address raises #GP, not #PF
            return w
    elif bits == 32:
        if addr >> 32:
            raise InvalidArgument("address", addr, f"{mode.name} linear addresses are 32 bits wide")
    elif addr >> (12 + 9 * mode.root_level):
        raise InvalidArgument("gpa", addr, f"{mode.name} translates {12 + 9 * mode.root_level}-bit addresses")
    if mode.root_level == 0:
        w.gpa = addr
        w.pte_access = 7
        return w
    for _ in range(_MAX_RESTARTS):
        if _walk_once(ctx, mem, root, addr, access, ac, pkru, pdptrs, w):
            return w
    raise InvalidArgument("page tables", addr, "entries kept changing under the walker (A/D cmpxchg lost)")


def _walk_once(ctx: PagingContext, mem: PteReader, root: int, addr: int, access: int, ac: bool,
               pkru: int, pdptrs: tuple[int, ...] | None, w: Walk) -> bool:
    """One attempt; False means an A/D cmpxchg lost a race and the walk must restart."""
    mode = ctx.mode
    ept = mode.ept
    esize = mode.entry_size
    ibits = mode.index_bits
    imask = (1 << ibits) - 1
    addr_mask = mode.addr_mask
    rsvd0, rsvd1 = ctx.rsvd
    is_large = ctx.is_large
    hw_ad = ctx.ad_policy == "hardware"
    if ept:
        a_bit, d_bit, use_ad = VMX_EPT_ACCESS_BIT, VMX_EPT_DIRTY_BIT, ctx.ept_ad
    else:
        a_bit, d_bit, use_ad = ACCESSED, DIRTY, True
    ptes, pte_addrs, pt_access, table_gfns = w.ptes, w.pte_addrs, w.pt_access, w.table_gfns
    level = mode.root_level
    acc = 7
    fault_code = 0
    misconfig = False

    if mode.pae_pdptes:
        table = root & 0xFFFFFFE0
        idx = (addr >> 30) & 3
        pte_addr = table + 8 * idx
        pte = pdptrs[idx] if pdptrs is not None else mem.read_pte(pte_addr, 8)
        ptes[3], pte_addrs[3], pt_access[3], table_gfns[3] = pte, pte_addr, 7, table >> 12
        w.level = 3
        if pte < 0 or not pte & 1:
            return _fault(ctx, w, access, 0, acc)
        if pte & rsvd0[3]:
            return _fault(ctx, w, access, PFERR_RSVD_MASK | PFERR_PRESENT_MASK, acc)
        table = pte & PT64_ADDR_MASK
        level = 2
    else:
        table = root & (addr_mask if esize == 4 else PT64_ADDR_MASK)

    while True:
        shift = 12 + ibits * (level - 1)
        pte_addr = table + esize * ((addr >> shift) & imask)
        pte = mem.read_pte(pte_addr, esize)
        ptes[level], pte_addrs[level], pt_access[level] = pte, pte_addr, acc
        table_gfns[level] = table >> 12
        w.level = level
        if pte < 0:                       # nothing backs the table: KVM injects a not-present #PF
            return _fault(ctx, w, access, 0, 0)
        if ept:
            if not pte & 7:
                return _fault(ctx, w, access, 0, 0)
            if pte & (rsvd1 if pte & 0x80 else rsvd0)[level] or (ctx.bad_mt_xwr >> (pte & 0x3F)) & 1:
                misconfig = True
                return _fault(ctx, w, access, 0, acc, misconfig)
            acc &= pte & 7
        else:
            if not pte & 1:
                return _fault(ctx, w, access, 0, acc)
            if pte & (rsvd1 if pte & 0x80 else rsvd0)[level]:
                return _fault(ctx, w, access, PFERR_RSVD_MASK | PFERR_PRESENT_MASK, acc)
            acc &= (pte & 6) | (1 ^ (pte >> 63))
        if level == 1 or (pte & 0x80 and is_large[level]):
            break
        if hw_ad and use_ad and not pte & a_bit:
            if not mem.cmpxchg_pte(pte_addr, esize, pte, pte | a_bit):
                return False
            pte |= a_bit
            ptes[level] = pte
        table = pte & addr_mask
        level -= 1

    # Leaf reached: the page frame and the effective rights.
    w.pte_access = acc
    if level == 1:
        gpa = (pte & addr_mask) | (addr & 0xFFF)
    elif esize == 4:                      # 4 MiB page; PSE-36 puts PA bits 35:32 in PDE bits 16:13
        gpa = (pte & 0xFFC00000) | ((pte & PT32_DIR_PSE36_MASK) << 19) | (addr & 0x3FFFFF)
    else:
        off = (1 << (12 + 9 * (level - 1))) - 1
        gpa = (pte & addr_mask & ~off) | (addr & off)
    w.gpa = gpa

    write = access & PFERR_WRITE_MASK
    if ept:
        need = (2 if write else 0) | (4 if access & PFERR_FETCH_MASK else 0) or 1
        if acc & need != need:
            return _fault(ctx, w, access, 0, acc)
    else:
        not_smap = ac and not access & PFERR_IMPLICIT_ACCESS
        idx = ((access & _ACCESS_BITS) | (PFERR_RSVD_MASK if not_smap else 0)) >> 1
        fault_code = PFERR_PRESENT_MASK if (ctx.permissions[idx] >> acc) & 1 else 0
        if ctx.pkeys_active and acc & 4 and not access & PFERR_FETCH_MASK:
            w.pkey = pkey = (pte >> 59) & 15
            kbits = (pkru >> (2 * pkey)) & 3
            if kbits & 1 or (kbits & 2 and write and (access & PFERR_USER_MASK or ctx.wp)):
                fault_code = PFERR_PRESENT_MASK | PFERR_PK_MASK
        if fault_code:
            return _fault(ctx, w, access, fault_code, acc)

    # Success: A on every entry used, D on the leaf for a write.
    if use_ad:
        for lvl in range(mode.root_level, level - 1, -1):
            old = ptes[lvl]
            if lvl == 3 and mode.pae_pdptes:
                continue
            new = old | a_bit
            if lvl == level and write:
                new |= d_bit
            if new != old:
                if not mem.cmpxchg_pte(pte_addrs[lvl], esize, old, new):
                    return False
                ptes[lvl] = new
    return True


def _fault(ctx: PagingContext, w: Walk, access: int, code: int, acc: int, misconfig: bool = False) -> bool:
    mode = ctx.mode
    if mode.ept:
        if misconfig:
            w.fault = EXIT_REASON_EPT_MISCONFIG
            w.error_code = 0
            return True
        qual = acc << 3
        if access & PFERR_WRITE_MASK:
            qual |= EPT_VIOLATION_ACC_WRITE
        elif access & PFERR_FETCH_MASK:
            qual |= EPT_VIOLATION_ACC_INSTR
        else:
            qual |= EPT_VIOLATION_ACC_READ
        w.fault = EXIT_REASON_EPT_VIOLATION
        w.error_code = qual
        w.pte_access = acc
        return True
    code |= access & (PFERR_WRITE_MASK | PFERR_USER_MASK)
    if access & PFERR_FETCH_MASK and ctx.id_on_fetch:
        code |= PFERR_FETCH_MASK
    w.fault = PF_VECTOR
    w.error_code = code
    return True
