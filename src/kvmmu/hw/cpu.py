"""The modelled CPU of one vCPU while the guest runs: a TLB and the walk of KVM's tables.

Under shadow paging the CPU walks KVM's sptes (never the guest's tables) with CR0.WP=1 and
EFER.NX=1; a miss that the sptes do not allow raises #PF to KVM with the hardware error code,
RSVD included when an MMIO spte (a reserved PA bit) was hit.  The TLB caches what the sptes said:
a guest page-table change is invisible until KVM zaps the spte and flushes, or the guest flushes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any, cast

from ..arch.bits import (
    PFERR_FETCH_MASK,
    PFERR_IMPLICIT_ACCESS,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    X86_EFLAGS_AC,
)
from ..arch.permission import PERMISSION_ACCESS_BITS, PERMISSION_NOT_SMAP, permission_fault, permission_index
from ..arch.walker import probe, walk
from ..errors import InvalidArgument
from .memory import PACK_INTO, UNPACK_FROM

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeAlias

    from ..arch.modes import PagingContext
    from .memory import SparseMemory
    from .vmcs import GuestRegisters, PagingState

    # A decoded access (DecodedAccesses): (vpn, page offset, size, pfec, CPL-inherit mask, value,
    # struct function).  The function is a pack_into for a write and an unpack_from otherwise; which
    # one follows from pfec's W bit, a distinction the type cannot carry.
    DecodedOp: TypeAlias = tuple[int, int, int, int, int, int | None, Callable[..., Any]]

# The accesses a vCPU performs (Vcpu.access): kinds and sizes in bytes.
# "rmw": the read of a read-modify-write, which the CPU translates for writing (a fault has W=1, the
# walk sets D) although it only loads; its store is a "write" of its own.
ACCESS_KINDS = ("read", "write", "fetch", "rmw")
ACCESS_SIZES = (1, 2, 4, 8, 16)

# The TLB-hit paths read the context's tables (arch/permission.py) inline, and leave to translate()
# any access that PKRU could deny (the context's PKRU mask has a bit for it).
_ACCESS_BITS = PERMISSION_ACCESS_BITS
# A TLB entry is (host page, ACC, kinds, pkey).  `kinds` are the access kinds it may serve without a
# walk, as PFERR bits, TLB_READ standing for a read: a write only through an entry a write filled
# (D bits set, KVM's spte writable); under EPT/NPT a read or fetch only if the TDP tables allowed
# it too, since a TLB entry holds the rights of both stages combined (SDM Vol. 3C 29.4.2).  The
# kind an access needs is `pfec & KIND_BITS or TLB_READ`.
TLB_READ = 1
KIND_BITS = PFERR_WRITE_MASK | PFERR_FETCH_MASK
# A shadow-paging entry: KVM's sptes already combine guest and host rights (ACC says it all).
SHADOW_KINDS = TLB_READ | PFERR_FETCH_MASK
# translate() returns (hpa, fault address, error code); a negative hpa says what happened instead.
VM_EXIT = -1        # exit to KVM with (address, error code)
GUEST_FAULT = -2    # a #PF went straight to the guest (TDP): (GUEST_FAULT, cr2, error code)
GP_FAULT = -3       # non-canonical address: #GP
# The walks take EFLAGS.AC as the flag's bit (rflags & X86_EFLAGS_AC), an int, for speed: the
# walker's `ac` parameters are `bool | int` (they only reach permission_fault's index).


class TlbCpu:
    """What the CPU does without leaving the TLB: accesses whose translation is cached.

    Shared by the shadow-paging CPU (permissions from KVM's `hw_ctx`) and the TDP CPU (the guest's
    `cpu_role`), both read from the loaded VMCS (`regs`, `paging`: hw/vmcs.py).  Each method
    decides exactly as `translate()` decides on a TLB hit, and changes nothing but memory and the
    tlb_hits counter, and only when the access completes; anything else (a miss, a permission
    failure, protection keys, memory outside the host) is left to translate().

    The paging contexts in `paging` are None until KVM first computes them (kvm_init_mmu, which
    kvm_mmu_load runs before it loads a root), and hw_ctx stays None under TDP.  KVM enters the
    guest only with a valid root, so each one the CPU reads is set: the methods here and in
    Cpu/TdpCpu take it as a PagingContext (a cast, no run-time check on these paths).
    """

    # The state of Cpu and TdpCpu that the methods here read (each sets tlb, mem and counters).
    __slots__ = ("regs", "paging", "tlb", "mem", "counters")
    tlb: dict[int, tuple[int, int, int, int]]
    regs: GuestRegisters
    paging: PagingState
    mem: SparseMemory
    counters: dict[str, int]
    two_dimensional = False           # True: permissions come from the guest's role (TdpCpu)
    # Whether the last exit was on the final translation rather than a guest page-table access:
    # always, without a 2-D walk (TdpCpu tracks it per exit).
    exit_final = True

    def refill(self, gva: int, pfec: int, ac: int, pkru: int) -> int:
        raise NotImplementedError     # Cpu and TdpCpu: a TLB miss that a walk which only reads completes

    def load_vmcs(self, regs: GuestRegisters, paging: PagingState) -> None:
        """VMPTRLD: the guest registers and the MMU context the CPU reads from now on (hw/vmcs.py)."""
        self.regs = regs
        self.paging = paging

    def tlb_hit(self, gva: int, pfec: int) -> int:
        """The host physical address if the TLB alone translates this access, else -1."""
        entry = self.tlb.get(gva >> 12)
        if entry is None:
            return -1
        page, acc, kinds, _ = entry
        if not kinds & (pfec & KIND_BITS or TLB_READ):
            return -1
        regs = self.regs
        ctx: PagingContext = self.paging.cpu_role if self.two_dimensional else self.paging.hw_ctx  # type: ignore[assignment]  # set at entry; no cast() call on the hot path
        if (ctx.permissions[permission_index(pfec, regs.rflags & X86_EFLAGS_AC)] >> acc) & 1 \
                or (ctx.pkru_mask and (ctx.pkru_mask >> ((pfec & _ACCESS_BITS) | (acc & 4) << 1)) & 3):
            return -1
        self.counters["tlb_hits"] += 1
        return page | (gva & 0xFFF)

    def tlb_access(self, gva: int, size: int, pfec: int, value: int | None) -> int:
        """A 1/2/4/8-byte access inside one page, completed from the TLB: the value read (0 for a
        write), or -1 if translate() must run.  pfec has no IMPLICIT bit; a write's value fits."""
        entry = self.tlb.get(gva >> 12)
        if entry is None:
            return -1
        page, acc, kinds, _ = entry
        if not kinds & (pfec & KIND_BITS or TLB_READ):
            return -1
        regs = self.regs
        ctx: PagingContext = self.paging.cpu_role if self.two_dimensional else self.paging.hw_ctx  # type: ignore[assignment]  # set at entry; no cast() call on the hot path
        if (ctx.permissions[((pfec & _ACCESS_BITS) | (PERMISSION_NOT_SMAP if regs.rflags & X86_EFLAGS_AC else 0)) >> 1]
                >> acc) & 1 or (ctx.pkru_mask and (ctx.pkru_mask >> ((pfec & _ACCESS_BITS) | (acc & 4) << 1)) & 3):
            return -1
        hpa = page | (gva & 0xFFF)
        mem = self.mem
        if hpa + size > mem.size:
            return -1
        host_page = mem.pages.get(hpa >> 12)
        if pfec & PFERR_WRITE_MASK:
            if host_page is None:
                host_page = mem.pages[hpa >> 12] = bytearray(0x1000)
            PACK_INTO[size](host_page, hpa & 0xFFF, value)
            value = 0
        else:
            value = 0 if host_page is None else UNPACK_FROM[size](host_page, hpa & 0xFFF)[0]
        self.counters["tlb_hits"] += 1
        return value

    def run_decoded(self, batch: DecodedAccesses, i: int, stop: int, cpl: int, values: list[int | None] | None) -> int:
        """Run the accesses batch[i:stop] while each one is a RAM access that the CPU completes
        without an exit (a TLB hit, or a miss whose walk only reads: `refill`); returns the index of
        the first one that needs more (or stop).

        The caller has made the checks KVM makes before entering the guest (no request pending, a
        valid root); nothing done here can change them, nor the CPL, EFLAGS.AC or PKRU read here
        once.  A read whose value nobody asked for (values is None) is not carried out: it would
        change nothing but the counters, which count it.
        """
        tlb_get = self.tlb.get
        refill = self.refill
        regs = self.regs
        ctx: PagingContext = self.paging.cpu_role if self.two_dimensional else self.paging.hw_ctx  # type: ignore[assignment]  # set at entry; no cast() call on the hot path
        perms = ctx.permissions
        pkru_mask = ctx.pkru_mask
        ac = regs.rflags & X86_EFLAGS_AC
        not_smap = PERMISSION_NOT_SMAP if ac else 0
        pkru = regs.pkru
        user = PFERR_USER_MASK if cpl == 3 else 0
        mem = self.mem
        pages = mem.pages
        pages_get = pages.get
        last_page = mem.size - 0x1000
        start = i
        walks = 0
        try:
            for d in islice(batch.decoded, i, stop):
                if d is None:
                    break
                vpn, off, size, pfec, umask, value, fn = d
                pfec |= user & umask
                entry = tlb_get(vpn)
                if entry is not None:
                    page, acc, kinds, _ = entry
                    if (perms[(pfec | not_smap) >> 1] >> acc) & 1 or not kinds & (pfec & KIND_BITS or TLB_READ):
                        # translate() drops such an entry and walks again (a write through an entry
                        # filled by a read, say): the same here, unless the walk needs more.
                        del self.tlb[vpn]
                        entry = None
                    elif page > last_page or (pkru_mask and (pkru_mask >> (pfec | (acc & 4) << 1)) & 3):
                        break
                if entry is None:
                    page = refill((vpn << 12) | off, pfec, ac, pkru)
                    if page < 0:
                        break
                    walks += 1
                if pfec & PFERR_WRITE_MASK:
                    host_page = pages_get(page >> 12)
                    if host_page is None:
                        host_page = pages[page >> 12] = bytearray(0x1000)
                    fn(host_page, off, value)
                    if values is not None:
                        values.append(None)
                elif values is not None:
                    host_page = pages_get(page >> 12)
                    values.append(0 if host_page is None else fn(host_page, off)[0])
                i += 1
        finally:
            if i - start > walks:
                self.counters["tlb_hits"] += i - start - walks
        return i


class DecodedAccesses:
    """Guest accesses decoded once for the CPU (as a CPU keeps decoded instructions in a uop cache).

    `ops` are access() argument tuples, (gva, size, kind[, value[, cpl[, implicit]]]).  Each one
    that can possibly complete from the TLB (a 1/2/4/8-byte access inside one page, valid
    arguments, not implicit) is decoded to (vpn, page offset, size, pfec, CPL-inherit mask, value,
    struct function); the others decode to None and always take access().  Decoding saves doing
    that for every replay of the same accesses.  Ops that are not valid access() arguments are
    refused here, as access() would refuse them, so that a batch with a bad op runs none of its ops.
    """

    __slots__ = ("ops", "decoded", "wide")

    def __init__(self, ops: Iterable[Sequence]) -> None:
        if not isinstance(ops, (list, tuple)):
            try:
                ops = list(ops)
            except TypeError:
                raise InvalidArgument("ops", ops, "ops is a sequence of access() argument tuples") from None
        for op in ops:
            if not isinstance(op, (list, tuple)) or not 3 <= len(op) <= 6:
                raise InvalidArgument("op", op, "an op is (gva, size, kind[, value[, cpl[, implicit]]])")
        self.ops = ops
        self.decoded = [_decode(op) for op in self.ops]
        for op, d in zip(self.ops, self.decoded, strict=True):
            if d is None:                   # (a decoded op has valid arguments by construction)
                check_access_args(*op)
        # The ops whose gva needs more than 32 bits: refused when the batch runs outside long mode.
        self.wide = tuple(i for i, op in enumerate(self.ops) if op[0] >> 32)

    def __len__(self) -> int:
        return len(self.ops)


def check_access_args(gva: object, size: object, kind: object, value: object = None, cpl: object = None,
                      implicit: object = False) -> None:
    """The argument checks of Vcpu.access(), for it and for a batch of ops before any op runs.  Those
    that depend on the vCPU's state when the op runs (a 32-bit mode's address width) stay there."""
    if kind not in ACCESS_KINDS:
        raise InvalidArgument("kind", kind, f"an access is one of {ACCESS_KINDS}")
    if type(size) is not int or size not in ACCESS_SIZES:
        raise InvalidArgument("size", size, f"an access is {', '.join(map(str, ACCESS_SIZES))} bytes")
    if not isinstance(gva, int) or gva < 0 or gva >> 64:
        raise InvalidArgument("gva", gva, "an address is an unsigned 64-bit integer")
    if cpl is not None and cpl not in (0, 1, 2, 3):
        raise InvalidArgument("cpl", cpl, "CPL is 0, 1, 2 or 3")
    if kind == "write":
        if isinstance(value, (bytes, bytearray)):
            if len(value) != size:
                raise InvalidArgument("value", value, f"a {size}-byte write needs {size} bytes of data")
        elif not (isinstance(value, int) and 0 <= value < 1 << (8 * size)):
            raise InvalidArgument("value", value, f"a {size}-byte write needs an int in [0, 2^{8 * size})")
    elif value is not None:
        raise InvalidArgument("value", value, "only writes carry a value")


def _decode(op: Sequence) -> DecodedOp | None:
    try:
        k = len(op)
    except TypeError:
        return None
    cpl = implicit = None
    fn: Callable[..., Any]
    if k == 4:
        gva, size, kind, value = op
    elif k == 5:
        gva, size, kind, value, cpl = op
    elif k == 3:
        gva, size, kind = op
        value = None
    elif k == 6:
        gva, size, kind, value, cpl, implicit = op
    else:
        return None
    if implicit or type(gva) is not int or type(size) is not int or not 0 <= gva <= 0xFFFF_FFFF_FFFF_FFFF \
            or not (size == 8 or size == 4 or size == 1 or size == 2) or (gva & 0xFFF) + size > 0x1000:
        return None
    if kind == "write":
        if type(value) is not int or not 0 <= value < 1 << (size << 3):
            return None
        pfec, fn = PFERR_WRITE_MASK, PACK_INTO[size]
    elif kind == "read" or kind == "fetch":
        if value is not None:
            return None
        pfec, fn = (0 if kind == "read" else PFERR_FETCH_MASK), UNPACK_FROM[size]
    else:
        return None
    if cpl is None:
        return (gva >> 12, gva & 0xFFF, size, pfec, PFERR_USER_MASK, value, fn)
    if type(cpl) is not int or not 0 <= cpl <= 3:
        return None
    if cpl == 3:
        pfec |= PFERR_USER_MASK
    return (gva >> 12, gva & 0xFFF, size, pfec, 0, value, fn)


class Cpu(TlbCpu):
    __slots__ = ()

    def __init__(self, mem: SparseMemory, counters: dict[str, int]) -> None:
        self.tlb: dict[int, tuple[int, int, int, int]] = {}    # vpn -> (host page, ACC, kinds, pkey)
        self.mem = mem
        self.counters = counters

    def flush(self) -> None:
        self.tlb.clear()

    def flush_gva(self, gva: int) -> None:
        self.tlb.pop(gva >> 12, None)

    def refill(self, gva: int, pfec: int, ac: int, pkru: int) -> int:
        """translate() on a TLB miss whose walk of KVM's tables only reads and allows the access:
        the walk is counted and the TLB filled, and the host page is returned; else -1, and nothing
        changed (translate() will do the whole miss)."""
        mmu = self.paging
        r = probe(cast("PagingContext", mmu.hw_ctx), self.mem, mmu.root_hpa, gva, pfec,
                  ac, pkru)
        if type(r) is not tuple or r[0] + 0x1000 > self.mem.size:
            return -1
        gpa, acc, pkey = r
        self.counters["hw_walks"] += 1
        page = gpa & ~0xFFF
        self.tlb[gva >> 12] = (page, acc, SHADOW_KINDS | (pfec & PFERR_WRITE_MASK), pkey)
        return page

    def translate(self, gva: int, pfec: int) -> tuple[int, int, int]:
        """(host physical address, gva, 0), or (VM_EXIT, gva, #PF error code), or (GP_FAULT, ...)."""
        regs = self.regs
        mmu = self.paging
        ctx: PagingContext = mmu.hw_ctx  # type: ignore[assignment]  # set at entry; no cast() call on the hot path
        vpn = gva >> 12
        entry = self.tlb.get(vpn)
        write = pfec & PFERR_WRITE_MASK
        if entry is not None:
            page, acc, kinds, pkey = entry
            if kinds & (pfec & KIND_BITS or TLB_READ) \
                    and not permission_fault(ctx, pfec, acc, regs.ac, regs.pkru, pkey):
                self.counters["tlb_hits"] += 1
                return page | (gva & 0xFFF), gva, 0
            del self.tlb[vpn]      # a fault through a TLB entry invalidates it; the CPU re-walks
        self.counters["hw_walks"] += 1
        r = probe(ctx, self.mem, mmu.root_hpa, gva, pfec,
                  regs.rflags & X86_EFLAGS_AC, regs.pkru)
        if r is not None:                # walk()'s answer, where walk() would have written nothing
            if type(r) is int:
                return VM_EXIT, gva, r | (pfec & PFERR_IMPLICIT_ACCESS)
            gpa, acc, pkey = cast("tuple[int, int, int]", r)   # (mypy narrows `type(r) is int` one way only)
            self.tlb[vpn] = (gpa & ~0xFFF, acc, SHADOW_KINDS | write, pkey)
            return gpa, gva, 0
        w = walk(ctx, self.mem, mmu.root_hpa, gva, pfec, ac=regs.ac, pkru=regs.pkru)
        if w.fault:
            if w.fault == 13:
                return GP_FAULT, gva, 0
            # The real error code cannot say "implicit"; the model tells KVM (docs/architecture/deviations.md).
            return VM_EXIT, gva, w.error_code | (pfec & PFERR_IMPLICIT_ACCESS)
        self.tlb[vpn] = (w.gpa & ~0xFFF, w.pte_access, SHADOW_KINDS | write, w.pkey)
        return w.gpa, gva, 0
