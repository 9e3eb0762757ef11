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

from collections.abc import Callable
from struct import Struct
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
from .permission import ept_violation, permission_fault

ACCESSED = 1 << 5
DIRTY = 1 << 6
_MAX_RESTARTS = 8
_UNPACK_Q = Struct("<Q").unpack_from
_UNPACK_I = Struct("<I").unpack_from


class PteReader(Protocol):
    """What the walker reads entries through.

    A reader that is plain memory may say so with `direct_pte_reads = True` and offer `pages` (page
    frame number -> 4 KiB little-endian bytearray) and `size`: the walker then reads an entry itself
    where `read_pte` would, an absent page reading as 0 below `size` and -1 above (SparseMemory).
    """

    def read_pte(self, addr: int, size: int) -> int: ...
    def cmpxchg_pte(self, addr: int, size: int, old: int, new: int) -> bool: ...


class DirectPteReader(PteReader, Protocol):
    """A PteReader that is plain memory (`direct_pte_reads` true): what probe() and probe_ept() read."""

    direct_pte_reads: bool
    pages: dict[int, bytearray]
    size: int


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
        self.ptes = [0, 0, 0, 0, 0, 0]
        self.pte_addrs = [-1, -1, -1, -1, -1, -1]
        self.pt_access = [0, 0, 0, 0, 0, 0]
        self.table_gfns = [0, 0, 0, 0, 0, 0]

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
         ac: bool | int = False, pkru: int = 0, pdptrs: tuple[int, ...] | None = None) -> Walk:
    """Translate `addr` for an access described by PFERR_* bits (W, U, F, IMPLICIT).

    root is CR3 (or the EPTP); `ac` is EFLAGS.AC; `pkru` the PKRU register; `pdptrs` the PAE PDPTEs
    cached at the last CR3 load (None: read them from memory).
    """
    plan = _PLANS.get(id(ctx))
    if plan is None or plan[0] is not ctx:
        plan = _plan(ctx)
    root_level = plan[1]
    w = Walk(addr, access, root_level)
    if addr < 0:
        raise InvalidArgument("address", addr, "addresses are unsigned")
    bits = plan[2]
    if bits > 32:
        top = addr >> (bits - 1)          # canonical(): bits 63..bits-1 all 0 or all 1
        if addr >> 64 or (top and top != plan[18]):
            w.fault = GP_VECTOR          # SDM: a non-canonical linear address raises #GP, not #PF
            return w
    elif bits == 32:
        if addr >> 32:
            raise InvalidArgument("address", addr, f"{ctx.mode.name} linear addresses are 32 bits wide")
    elif addr >> (12 + 9 * root_level):
        raise InvalidArgument("gpa", addr, f"{ctx.mode.name} translates {12 + 9 * root_level}-bit addresses")
    if root_level == 0:
        w.gpa = addr
        w.pte_access = 7
        return w
    for _ in range(_MAX_RESTARTS):
        if _walk_once(plan, ctx, mem, root, addr, access, ac, pkru, pdptrs, w):
            return w
    raise InvalidArgument("page tables", addr, "entries kept changing under the walker (A/D cmpxchg lost)")


# What _walk_once needs of a PagingContext, gathered once per context (contexts never change).
_PLANS: dict[int, tuple] = {}


def _plan(ctx: PagingContext) -> tuple:
    mode = ctx.mode
    if mode.ept:
        a_bit, d_bit, use_ad = VMX_EPT_ACCESS_BIT, VMX_EPT_DIRTY_BIT, ctx.ept_ad
    else:
        a_bit, d_bit, use_ad = ACCESSED, DIRTY, True
    addr_mask = mode.addr_mask
    plan = (ctx, mode.root_level, mode.la_bits, mode.ept, mode.entry_size, mode.index_bits,
            (1 << mode.index_bits) - 1, addr_mask, ctx.rsvd[0], ctx.rsvd[1], ctx.is_large,
            ctx.ad_policy == "hardware", a_bit, d_bit, use_ad, mode.pae_pdptes, ctx.bad_mt_xwr,
            addr_mask if mode.entry_size == 4 else PT64_ADDR_MASK,
            (1 << (65 - mode.la_bits)) - 1 if mode.la_bits > 32 else 0)
    if len(_PLANS) >= 256:
        _PLANS.clear()
    _PLANS[id(ctx)] = plan
    return plan


def _walk_once(plan: tuple, ctx: PagingContext, mem: PteReader, root: int, addr: int, access: int, ac: bool | int,
               pkru: int, pdptrs: tuple[int, ...] | None, w: Walk) -> bool:
    """One attempt; False means an A/D cmpxchg lost a race and the walk must restart."""
    (_, root_level, _, ept, esize, ibits, imask, addr_mask, rsvd0, rsvd1, is_large, hw_ad, a_bit, d_bit, use_ad,
     pae_pdptes, bad_mt_xwr, root_mask, _) = plan
    ptes, pte_addrs, pt_access, table_gfns = w.ptes, w.pte_addrs, w.pt_access, w.table_gfns
    # A reader over plain host memory lets the walker read entries itself (see PteReader).
    if getattr(mem, "direct_pte_reads", False):
        direct: DirectPteReader = mem  # type: ignore[assignment]  # direct_pte_reads says so; no cast() call per walk
        pages_get = direct.pages.get
        limit = direct.size
        unpack = _UNPACK_Q if esize == 8 else _UNPACK_I
    else:
        pages_get = None
        read_pte = mem.read_pte
    level = root_level
    acc = 7
    missing_a = False                     # an entry used above the leaf has no A bit (yet)

    if pae_pdptes:
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
        table = root & root_mask

    while True:
        off = esize * ((addr >> (12 + ibits * (level - 1))) & imask)     # tables are page aligned
        pte_addr = table + off
        gfn = table >> 12
        if pages_get is not None:
            page = pages_get(gfn)
            if page is None:
                pte = 0 if 0 <= pte_addr < limit else -1
            else:
                pte = unpack(page, off)[0]
        else:
            pte = read_pte(pte_addr, esize)
        ptes[level], pte_addrs[level], pt_access[level] = pte, pte_addr, acc
        table_gfns[level] = gfn
        w.level = level
        if pte < 0:                       # nothing backs the table: KVM injects a not-present #PF
            return _fault(ctx, w, access, 0, 0)
        low = pte & 0xFFF                 # (one operation on the 64-bit entry instead of several)
        if ept:
            if not low & 7:
                return _fault(ctx, w, access, 0, 0)
            if pte & (rsvd1 if low & 0x80 else rsvd0)[level] or (bad_mt_xwr >> (low & 0x3F)) & 1:
                return _fault(ctx, w, access, 0, acc, True)
            acc &= low & 7
        else:
            if not low & 1:
                return _fault(ctx, w, access, 0, acc)
            if pte & (rsvd1 if low & 0x80 else rsvd0)[level]:
                return _fault(ctx, w, access, PFERR_RSVD_MASK | PFERR_PRESENT_MASK, acc)
            acc &= (low & 6) | (1 ^ (pte >> 63))
        if level == 1 or (low & 0x80 and is_large[level]):
            break
        if not low & a_bit:
            if hw_ad and use_ad:
                if not mem.cmpxchg_pte(pte_addr, esize, pte, pte | a_bit):
                    return False
                pte |= a_bit
                ptes[level] = pte
            else:
                missing_a = True
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
        if ept_violation(access, acc):
            return _fault(ctx, w, access, 0, acc)
    else:
        if ctx.pkeys_active:
            # The leaf's key is part of the translation whatever this access is: a TLB entry that a
            # fetch filled must still check the right key for a later read (SDM 4.10.2.2).
            w.pkey = (pte >> 59) & 15
        fault_code = permission_fault(ctx, access, acc, ac, pkru, w.pkey)
        if fault_code:
            return _fault(ctx, w, access, fault_code, acc)

    # Success: A on every entry used, D on the leaf for a write (nothing to do if all are set).
    if use_ad and (missing_a or not low & a_bit or (write and not low & d_bit)):
        for lvl in range(root_level, level - 1, -1):
            old = ptes[lvl]
            if lvl == 3 and pae_pdptes:
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


# -- probes: walk() for the common cases of the hardware walks, without a Walk and writing nothing -----
# A probe reads the same entries walk() would read, and answers only when walk() would write nothing
# (no A/D bit to set, no restart) - the answer is then walk()'s.  Otherwise it answers "ask walk()",
# having changed nothing, so calling walk() next is exactly calling it in the first place.
PROBE_WALK = -1            # probe_ept: ask walk()
PROBE_MISCONFIG = -2       # probe_ept: walk() would report EXIT_REASON_EPT_MISCONFIG


def _probe_plan(ctx: PagingContext) -> tuple:
    """What the probes need of a context (cached like _plan); field 1 says whether they can run."""
    mode = ctx.mode
    if mode.ept:
        a_bit, d_bit, use_ad = VMX_EPT_ACCESS_BIT, VMX_EPT_DIRTY_BIT, ctx.ept_ad
    else:
        a_bit, d_bit, use_ad = ACCESSED, DIRTY, True
    bits = mode.la_bits
    if mode.ept:
        ok = True
        canon_shift, canon_top = 12 + 9 * mode.root_level, 0     # probe_ept: gpa >> shift must be 0
    elif bits == 0:
        ok = True                                                # NPT: a gpa, no canonical check
        canon_shift, canon_top = 12 + 9 * mode.root_level, 0
    else:
        ok = mode.entry_size == 8 and not mode.pae_pdptes and bits > 32
        canon_shift, canon_top = (bits - 1, (1 << (65 - bits)) - 1) if ok else (0, 0)
    plan = (ctx, ok, mode.root_level, canon_shift, canon_top, mode.addr_mask, ctx.rsvd[0], ctx.rsvd[1],
            ctx.is_large, ctx.ad_policy == "hardware", a_bit, d_bit, use_ad, ctx.bad_mt_xwr, mode.ept)
    if len(_PROBE_PLANS) >= 256:
        _PROBE_PLANS.clear()
    _PROBE_PLANS[id(ctx)] = plan
    return plan


_PROBE_PLANS: dict[int, tuple] = {}


def probe(ctx: PagingContext, mem: DirectPteReader, root: int, addr: int, access: int, ac: bool | int = False,
          pkru: int = 0, table_hpa: Callable[[int], int] | None = None) -> tuple[int, int, int] | int | None:
    """4- and 5-level paging: (gpa, pte_access, pkey) when walk() would translate, the #PF error code
    (an int) when walk() would raise a #PF, None when walk() must run (it would set an A or D bit or
    raise #GP, or the mode is another).  `mem` is plain memory (`direct_pte_reads`).

    With `table_hpa` the tables are in guest-physical memory (the guest walk of a 2-D walk):
    table_hpa(entry address) is where the entry is in `mem`, or negative if translating the
    address would do more than read (then None); any fault also answers None.
    """
    plan = _PROBE_PLANS.get(id(ctx))
    if plan is None or plan[0] is not ctx:
        plan = _probe_plan(ctx)
    (_, ok, level, canon_shift, canon_top, addr_mask, rsvd0, rsvd1, is_large, hw_ad, a_bit, d_bit, use_ad, _,
     ept) = plan
    if not ok or ept:
        return None
    top = addr >> canon_shift
    if addr < 0 or (top and top != canon_top):
        return None
    pages_get = mem.pages.get
    table = root & PT64_ADDR_MASK
    acc = 7
    missing_a = False                     # an entry above the leaf without A (the "kvm" policy sets it)
    code = -1
    while True:
        off = 8 * ((addr >> (3 + 9 * level)) & 511)
        if table_hpa is None:
            page = pages_get(table >> 12)
        else:
            hpa = table_hpa(table + off)
            if hpa < 0:
                return None
            page = pages_get(hpa >> 12)
            off = hpa & 0xFFF
        if page is None:                  # reads as 0 (or -1 beyond memory): not present either way
            code = 0
            break
        pte = _UNPACK_Q(page, off)[0]
        low = pte & 0xFFF
        if not low & 1:
            code = 0
            break
        if pte & (rsvd1 if low & 0x80 else rsvd0)[level]:
            code = PFERR_RSVD_MASK | PFERR_PRESENT_MASK
            break
        acc &= (low & 6) | (1 ^ (pte >> 63))
        if level == 1 or (low & 0x80 and is_large[level]):
            break
        if not low & a_bit:
            if hw_ad:
                return None               # walk() sets A here
            missing_a = True
        table = pte & addr_mask
        level -= 1
    pkey = 0
    if code < 0:
        if ctx.pkeys_active:
            pkey = (pte >> 59) & 15
        code = permission_fault(ctx, access, acc, ac, pkru, pkey) or -1
    if code >= 0:                         # walk()'s _fault(), with nothing written on the way
        if table_hpa is not None:
            return None
        code |= access & (PFERR_WRITE_MASK | PFERR_USER_MASK)
        if access & PFERR_FETCH_MASK and ctx.id_on_fetch:
            code |= PFERR_FETCH_MASK
        return code
    if use_ad and (missing_a or not low & a_bit or (access & PFERR_WRITE_MASK and not low & d_bit)):
        return None                       # walk() sets A or D now
    if level == 1:
        return (pte & addr_mask) | (addr & 0xFFF), acc, pkey
    off = (1 << (3 + 9 * level)) - 1
    return (pte & addr_mask & ~off) | (addr & off), acc, pkey


def probe_ept(ctx: PagingContext, mem: DirectPteReader, root: int, gpa: int, access: int) -> int:
    """EPT: the host physical address when walk() would translate, PROBE_MISCONFIG when it would
    report a misconfiguration, PROBE_WALK when walk() must run (an A/D bit to set, a violation, an
    out-of-range gpa, or another mode).  `mem` is plain memory (`direct_pte_reads`)."""
    return probe_ept_rights(ctx, mem, root, gpa, access)[0]


def probe_ept_rights(ctx: PagingContext, mem: DirectPteReader, root: int, gpa: int, access: int) -> tuple[int, int]:
    """probe_ept's answer, with the R/W/X rights of the whole translation (the AND over every level,
    SDM Vol. 3C 29.3.3.2) when it translates, for a TLB that caches combined rights."""
    plan = _PROBE_PLANS.get(id(ctx))
    if plan is None or plan[0] is not ctx:
        plan = _probe_plan(ctx)
    (_, _, level, canon_shift, _, addr_mask, rsvd0, rsvd1, is_large, hw_ad, a_bit, d_bit, use_ad, bad_mt_xwr,
     ept) = plan
    if not ept or gpa < 0 or gpa >> canon_shift:
        return PROBE_WALK, 0
    pages_get = mem.pages.get
    table = root & PT64_ADDR_MASK
    acc = 7
    missing_a = False
    while True:
        page = pages_get(table >> 12)
        if page is None:
            return PROBE_WALK, 0          # a zero entry (a violation) or nothing there
        pte = _UNPACK_Q(page, 8 * ((gpa >> (3 + 9 * level)) & 511))[0]
        low = pte & 0xFFF
        if not low & 7:
            return PROBE_WALK, 0
        if pte & (rsvd1 if low & 0x80 else rsvd0)[level] or (bad_mt_xwr >> (low & 0x3F)) & 1:
            return PROBE_MISCONFIG, 0
        acc &= low
        if level == 1 or (low & 0x80 and is_large[level]):
            break
        if not low & a_bit:
            if hw_ad and use_ad:
                return PROBE_WALK, 0
            missing_a = True
        table = pte & addr_mask
        level -= 1
    write = access & PFERR_WRITE_MASK
    if ept_violation(access, acc) or (use_ad and (missing_a or not low & a_bit or (write and not low & d_bit))):
        return PROBE_WALK, 0
    if level == 1:
        return (pte & addr_mask) | (gpa & 0xFFF), acc & 7
    off = (1 << (3 + 9 * level)) - 1
    return (pte & addr_mask & ~off) | (gpa & off), acc & 7
