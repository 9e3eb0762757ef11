"""The modelled CPU with two-dimensional paging (EPT or NPT).

The CPU walks the guest's own tables, translating every table access and the final gpa through
KVM's TDP tables.  A guest #PF goes straight to the guest (no exit, so KVM never counts it); a
problem in KVM's tables is an EPT violation / misconfiguration (or an NPT #NPF) exit with the gpa.
Guest A/D bits are set by this walk, the way hardware does it (A on upper levels even when the
walk then faults).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from ..arch.bits import (
    ACC_USER_MASK,
    EXIT_REASON_EPT_MISCONFIG,
    EXIT_REASON_EPT_VIOLATION,
    PFERR_FETCH_MASK,
    PFERR_GUEST_FINAL_MASK,
    PFERR_GUEST_PAGE_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    X86_EFLAGS_AC,
)
from ..arch.modes import PagingContext
from ..arch.permission import access_fault, ept_violation, permission_fault
from ..arch.walker import PROBE_MISCONFIG, probe, probe_ept, probe_ept_rights, walk
from .cpu import GP_FAULT, GUEST_FAULT, KIND_BITS, TLB_READ, VM_EXIT, TlbCpu

if TYPE_CHECKING:
    from .host import Host
    from .vmcs import TdpControls

# The TLB kinds (hw/cpu.py) that the rights of a TDP translation allow, by the second-stage rules
# (arch/permission.py): EPT's R/W/X; NPT's ACC bits for a user access with WP and NX in force (every
# NPT access is a user access, so rights cached at all include U: the walk that filled them needed it).
_KINDS = ((TLB_READ, 0), (PFERR_WRITE_MASK, PFERR_WRITE_MASK), (PFERR_FETCH_MASK, PFERR_FETCH_MASK))
_EPT_KINDS = tuple(sum(kind for kind, access in _KINDS if not ept_violation(access, r)) for r in range(8))
_NPT_KINDS = tuple(sum(kind for kind, access in _KINDS
                       if not access_fault(access | PFERR_USER_MASK, a | ACC_USER_MASK, wp=True, nx=True, smep=False,
                                           smap=False, ac=False))
                   for a in range(8))


class _TdpExit(Exception):
    def __init__(self, gpa: int, error_code: int, final: bool = True) -> None:
        self.gpa, self.error_code, self.final = gpa, error_code, final


def ept_violation_to_pfec(qual: int, final: bool) -> int:
    """__vmx_handle_ept_violation: the exit qualification as a PFEC (a read is reported as U)."""
    code = (PFERR_USER_MASK if qual & 1 else 0) | (PFERR_WRITE_MASK if qual & 2 else 0)
    code |= PFERR_FETCH_MASK if qual & 4 else 0
    code |= PFERR_PRESENT_MASK if qual & 0x38 else 0
    return code | (PFERR_GUEST_FINAL_MASK if final else PFERR_GUEST_PAGE_MASK)


def _unmapped_code(ept: bool, pfec: int, final: bool) -> int:
    """The exit's error code for a gpa no TDP entry maps: an EPT violation with no rights found, or an
    #NPF with P=0 (NPT accesses are user accesses)."""
    if ept:
        qual = 2 if pfec & PFERR_WRITE_MASK else 4 if pfec & PFERR_FETCH_MASK else 1
        return ept_violation_to_pfec(qual, final)
    code = (pfec & (PFERR_WRITE_MASK | PFERR_FETCH_MASK)) | PFERR_USER_MASK
    return code | (PFERR_GUEST_FINAL_MASK if final else PFERR_GUEST_PAGE_MASK)


class TdpCpu(TlbCpu):
    """A vCPU's CPU under EPT/NPT: TLB of combined translations, and the 2-D walk on a miss."""

    __slots__ = ("gpa_cache", "host", "ept", "ept_ad", "tdp_ctx", "_ctxs", "_reader", "exit_final")
    two_dimensional = True

    def __init__(self, host: Host, counters: dict[str, int], controls: TdpControls) -> None:
        self.tlb: dict[int, tuple[int, int, int, int]] = {}
        # Guest-physical mappings of guest page-table pages, for reads (SDM Vol. 3C 29.4: a CPU may
        # cache EPT translations; KVM flushes after changing a TDP spte, and flush() drops them).
        self.gpa_cache: dict[int, int] = {}
        self.mem = host.mem
        self.host = host
        self.counters = counters
        self.ept = controls.ept
        self.ept_ad = controls.ept_ad
        level = controls.level
        if self.ept:
            self.tdp_ctx = PagingContext(f"ept{level}", maxphyaddr=host.maxphyaddr,
                                         ept_ad=controls.ept_ad, ad_policy="hardware")
        else:
            self.tdp_ctx = PagingContext(f"npt{level}", maxphyaddr=host.maxphyaddr, nxe=True, wp=True,
                                         ad_policy="hardware")
        self._ctxs = {level: self.tdp_ctx}
        self._reader = _GuestTableReader(self)
        # Whether the last exit was on the final translation (not a guest page-table access).  An EPT
        # misconfiguration does not say so in its error code (VMX reports nothing); KVM then takes
        # the fault address as the data's gpa, which only the kvm_deviations mode does.
        self.exit_final = True

    def flush(self) -> None:
        self.tlb.clear()
        self.gpa_cache.clear()

    def flush_gva(self, gva: int) -> None:
        # The guest's translation may be a 2 MiB or 1 GiB page cached here as 4 KiB pieces; INVLPG
        # (and a #PF) must drop every piece.  Dropping more than asked is always allowed.
        self.tlb.clear()

    def _ctx(self) -> PagingContext:
        """The context of the root in use: the VM's TDP depth, or under nested EPT the depth of L1's
        EPT, which the shadow EPT root (guest_mmu) copies."""
        level = self.paging.root_level
        ctx = self._ctxs.get(level)
        if ctx is None:
            ctx = self._ctxs[level] = PagingContext(f"ept{level}", maxphyaddr=self.host.maxphyaddr,
                                                    ept_ad=self.ept_ad, ad_policy="hardware")
        return ctx

    def gpa_to_hpa(self, gpa: int, pfec: int, final: bool) -> int:
        """Translate through KVM's TDP tables or raise the exit the hardware would take."""
        return self.tdp_translate(gpa, pfec, final)[0]

    def tdp_translate(self, gpa: int, pfec: int, final: bool) -> tuple[int, int]:
        """gpa_to_hpa, with the TLB kinds the TDP translation's rights allow (reads, writes, fetches)."""
        ctx = self._ctx()
        root = self.paging.root_hpa
        if gpa >> (12 + 9 * ctx.mode.root_level):
            # Beyond what this table translates (a 4-level table: 48 bits): nothing maps it, so the
            # hardware reports it like any unmapped gpa.  KVM finds no memslot there (none may reach
            # past kvm_mmu_max_gfn) and emulates the access.
            raise _TdpExit(gpa, _unmapped_code(self.ept, pfec, final), final)
        if self.ept:
            hpa, rights = probe_ept_rights(ctx, self.mem, root, gpa, pfec & (PFERR_WRITE_MASK | PFERR_FETCH_MASK))
            if hpa >= 0:
                return hpa, _EPT_KINDS[rights]
            if hpa == PROBE_MISCONFIG:
                raise _TdpExit(gpa, PFERR_RSVD_MASK, final)
            w = walk(ctx, self.mem, root, gpa, pfec & (PFERR_WRITE_MASK | PFERR_FETCH_MASK))
            if w.fault == EXIT_REASON_EPT_MISCONFIG:
                raise _TdpExit(gpa, PFERR_RSVD_MASK, final)
            if w.fault == EXIT_REASON_EPT_VIOLATION:
                raise _TdpExit(gpa, ept_violation_to_pfec(w.error_code, final))
            return w.gpa, _EPT_KINDS[w.pte_access & 7]
        # NPT: every access through the nested tables is a user access.
        kind = (pfec & (PFERR_WRITE_MASK | PFERR_FETCH_MASK)) | PFERR_USER_MASK
        r = probe(ctx, self.mem, root, gpa, kind)
        if r is not None:
            if type(r) is int:
                raise _TdpExit(gpa, r | (PFERR_GUEST_FINAL_MASK if final else PFERR_GUEST_PAGE_MASK))
            t = cast("tuple[int, int, int]", r)    # (mypy narrows `type(r) is int` one way only)
            return t[0], _NPT_KINDS[t[1]]
        w = walk(ctx, self.mem, root, gpa, kind)
        if w.fault:
            raise _TdpExit(gpa, w.error_code | (PFERR_GUEST_FINAL_MASK if final else PFERR_GUEST_PAGE_MASK))
        return w.gpa, _NPT_KINDS[w.pte_access & 7]

    def _table_hpa(self, gpa: int) -> int:
        """Where a guest page-table entry is in host memory, if reading it through KVM's tables
        takes no exit and sets no A/D bit (gpa_to_hpa(gpa, 0, False) would only read); else -1."""
        page = self.gpa_cache.get(gpa >> 12)
        if page is not None:
            return page | (gpa & 0xFFF)
        ctx = self._ctx()
        if gpa >> (12 + 9 * ctx.mode.root_level):
            return -1
        if self.ept:
            hpa = probe_ept(ctx, self.mem, self.paging.root_hpa, gpa, 0)
        else:
            r = probe(ctx, self.mem, self.paging.root_hpa, gpa, PFERR_USER_MASK)
            hpa = r[0] if type(r) is tuple else -1
        if hpa >= 0:
            self.gpa_cache[gpa >> 12] = hpa & ~0xFFF
        return hpa

    def refill(self, gva: int, pfec: int, ac: int, pkru: int) -> int:
        """translate() on a TLB miss whose 2-D walk only reads and allows the access: the walk is
        counted and the TLB filled, and the host page is returned; else -1, and nothing changed."""
        regs = self.regs
        ctx = self._ctx()
        mmu = self.paging
        hw_ctx: PagingContext = mmu.hw_guest_ctx  # type: ignore[assignment]  # set at entry; no cast() call on the hot path
        if hw_ctx.mode.root_level == 0:
            if gva >> 32:
                return -1                 # paging off: 32-bit linear addresses (the vCPU refuses more)
            gpa, acc, pkey = gva, 7, 0
        else:
            r = probe(hw_ctx, self.mem, regs.cr3, gva, pfec, ac, pkru,
                      self._table_hpa)
            if r is None:
                return -1
            gpa, acc, pkey = cast("tuple[int, int, int]", r)   # with table_hpa, a fault answers None
        if gpa >> (12 + 9 * ctx.mode.root_level):
            return -1
        if self.ept:
            hpa, rights = probe_ept_rights(ctx, self.mem, mmu.root_hpa, gpa,
                                           pfec & (PFERR_WRITE_MASK | PFERR_FETCH_MASK))
            kinds = _EPT_KINDS[rights]
        else:
            r = probe(ctx, self.mem, mmu.root_hpa, gpa,
                      (pfec & (PFERR_WRITE_MASK | PFERR_FETCH_MASK)) | PFERR_USER_MASK)
            hpa, kinds = (r[0], _NPT_KINDS[r[1]]) if type(r) is tuple else (-1, 0)
        if hpa < 0 or hpa + 0x1000 > self.mem.size:
            return -1
        self.counters["hw_walks"] += 1
        page = hpa & ~0xFFF
        self.tlb[gva >> 12] = (page, acc, kinds & (TLB_READ | PFERR_FETCH_MASK | (pfec & PFERR_WRITE_MASK)), pkey)
        return page

    def translate(self, gva: int, pfec: int) -> tuple[int, int, int]:
        regs = self.regs
        vpn = gva >> 12
        write = pfec & PFERR_WRITE_MASK
        entry = self.tlb.get(vpn)
        ctx: PagingContext = self.paging.cpu_role  # type: ignore[assignment]  # set at entry; no cast() call on the hot path
        if entry is not None:
            # An entry filled by a read never serves a write: the write re-walks (guest D bit, and
            # KVM's TDP spte may be write-protected for dirty logging).  Nor does one serve a kind of
            # access the TDP translation does not allow (a fetch from a page EPT maps without X).
            page, acc, kinds, pkey = entry
            if kinds & (pfec & KIND_BITS or TLB_READ) \
                    and not permission_fault(ctx, pfec, acc, regs.ac, regs.pkru, pkey):
                self.counters["tlb_hits"] += 1
                return page | (gva & 0xFFF), gva, 0
            del self.tlb[vpn]
        self.counters["hw_walks"] += 1
        hw_ctx: PagingContext = self.paging.hw_guest_ctx  # type: ignore[assignment]  # set at entry; no cast() call on the hot path
        r = None
        try:
            if hw_ctx.mode.root_level == 0:
                gpa, acc, pkey = gva, 7, 0
            else:
                # The guest walk without a Walk when it would only read (see walker.probe); its
                # table reads went through KVM's tables without exit or A/D update, so what follows
                # is what follows walk().
                r = probe(hw_ctx, self.mem, regs.cr3, gva, pfec,
                          regs.rflags & X86_EFLAGS_AC, regs.pkru,
                          self._table_hpa)
                if r is not None:
                    gpa, acc, pkey = cast("tuple[int, int, int]", r)   # with table_hpa, a fault answers None
                else:
                    pdptrs = self.paging.pdptrs if hw_ctx.mode.pae_pdptes else None
                    self._reader.pages.clear()
                    w = walk(hw_ctx, self._reader, regs.cr3, gva, pfec, ac=regs.ac, pkru=regs.pkru, pdptrs=pdptrs)
                    if w.fault == 13:
                        return GP_FAULT, gva, 0
                    if w.fault:
                        self.flush_gva(gva)      # a #PF invalidates the TLB entries for its address
                        return GUEST_FAULT, gva, w.error_code
                    gpa, acc, pkey = w.gpa, w.pte_access, w.pkey
            hpa, kinds = self.tdp_translate(gpa, pfec, True)
        except _TdpExit as e:
            self.exit_final = e.final
            if self.host.memory_limit is not None:
                # KVM will fault in the exit's page; the retried walk needs these ones still there.
                self.host.pin_walk(self._walk_pages(gva, pfec, r))
            return VM_EXIT, e.gpa, e.error_code
        if self.host.walk_pins:
            self.host.unpin_walk()
        self.tlb[vpn] = (hpa & ~0xFFF, acc, kinds & (TLB_READ | PFERR_FETCH_MASK | write), pkey)
        return hpa, gva, 0

    def _walk_pages(self, gva: int, pfec: int, probed: tuple[int, int, int] | int | None) -> list[int]:
        """Host pages of the guest tables the exiting 2-D walk got through, for Host.pin_walk.

        The retried walk needs them all mapped at once, with the page KVM is about to fault in.  The
        slow walk recorded them as it read (_GuestTableReader.pages).  A walk that probe() did (the
        guest tables all readable, the exit on the final gpa) recorded nothing, to keep that hot path
        free of bookkeeping; probe() only reads, so it is run again here, recording.
        """
        regs = self.regs
        hw_ctx: PagingContext = self.paging.hw_guest_ctx  # type: ignore[assignment]  # set at entry; no cast() call on the hot path
        if hw_ctx.mode.root_level == 0:
            return []                         # paging off: the walk reads no guest tables
        if type(probed) is not tuple:
            return [hpa >> 12 for hpa in self._reader.pages]
        pages: list[int] = []

        def table_hpa(gpa: int) -> int:
            hpa = self._table_hpa(gpa)
            if hpa >= 0:
                pages.append(hpa >> 12)
            return hpa

        probe(hw_ctx, self.mem, regs.cr3, gva, pfec, regs.rflags & X86_EFLAGS_AC, regs.pkru,
              table_hpa)
        return pages


class _GuestTableReader:
    """Guest page-table accesses during a 2-D walk: each goes through KVM's TDP tables."""

    __slots__ = ("cpu", "mem", "pages")

    def __init__(self, cpu: TdpCpu) -> None:
        self.cpu = cpu
        self.mem = cpu.mem
        # Host addresses of the table entries this walk has read so far: if the walk exits, those
        # pages must stay resident for the retry (TdpCpu._walk_pages, Host.pin_walk).
        self.pages: list[int] = []

    def read_pte(self, gpa: int, size: int) -> int:
        hpa = self.cpu.gpa_to_hpa(gpa, 0, False)
        self.pages.append(hpa)
        return self.mem.read(hpa, size)

    def cmpxchg_pte(self, gpa: int, size: int, old: int, new: int) -> bool:
        return self.mem.cmpxchg_pte(self.cpu.gpa_to_hpa(gpa, PFERR_WRITE_MASK, False), size, old, new)
