"""The fuzzer's architectural reference: what a guest may observe, computed from first principles.

Nothing here imports kvmmu.  The reference keeps its own copy of the machine:

* guest memory, as the VMM's backing pages (keyed by host virtual address, so a memslot that moves
  keeps its contents and a deleted slot re-created on the same backing finds them again);
* the memslot map (gpa -> backing, read-only or not);
* each vCPU's architectural registers (paging mode, CR3, CR0.WP, CR4.SMEP/SMAP/PKE/PGE/PSE,
  EFER.NXE, EFLAGS.AC, PKRU, PAE PDPTE registers);
* each vCPU's *possible TLB*: every translation the logical processor may still hold.

An access is answered with the set of outcomes the architecture allows (`Reference.outcomes`); the
fuzzer keeps the one the model produced (the model's result and memory must match one of them) and
commits it.  The latitude is exactly that of the TLB (Intel SDM Vol. 3A, 4.10):

* a translation may be cached once the walk that creates it succeeded structurally (every entry
  present, no reserved bit) and every entry on the path has A=1: after an access that used it, or
  speculatively at any time while it is valid for the vCPU's current paging state (this is what
  KVM's shadow-PTE prefetch amounts to);
* an access may use any cached translation for its page instead of walking; a cached translation
  whose rights deny the access may fault (with its own error code) but never has to: the access may
  walk instead; a write through a translation cached with D=0 always walks (to set D);
* INVLPG removes every cached translation whose page contains the address, including all 4 KiB
  pieces of a large page and global translations; MOV to CR3 removes all non-global ones;
  a change of CR4.PGE removes all, CR4.SMEP 0->1 removes all, and (the strict reading where the SDM
  is silent) so does a change of EFER.NXE; CR0.WP, CR4.SMAP/PKE, EFLAGS.AC and PKRU changes remove
  nothing, their checks apply at access time; a #PF removes every translation for its address;
* paging-structure caches are NOT part of the latitude: a walk always reads every level from memory
  (neither KVM's shadow MMU, which zaps on every upper-level write, nor the model's TDP CPU can mix
  a stale upper-level entry with a current lower one, and the fuzzer wants to know if one ever does);
* the guest-physical side is never cached: a memslot change is visible to the very next access.

Guest A/D bits follow one of two policies (docs/spec/x86-access.md §5.9, docs/spec/kvm-pvm-host.md §2):
  "kvm" (shadow paging: KVM's software walker): A on every level and D on the leaf of a write, only
  when the access is allowed; nothing on a fault.
  "hardware" (EPT/NPT: the CPU walks): the same on success; on a fault, A on the non-leaf entries the
  walk went through, top down -- possibly stopping early (an A-bit write the CPU cannot do, e.g. in a
  read-only memslot, exits to KVM, whose emulator finishes the walk with the "kvm" policy).
Entries in read-only memslots never get A/D bits (KVM skips them).  A paging structure at a gpa with
no memslot cannot be read: the walk faults there as not-present (KVM injects #PF(P=0)).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

PAGE = 0x1000
U64 = (1 << 64) - 1
KiB4, MiB2, MiB4, GiB1 = 1 << 12, 1 << 21, 1 << 22, 1 << 30

# Paging-entry bits (SDM 4.3-4.5).
P, RW, US, PWT, PCD, A, D, PS, G = 1, 2, 4, 8, 16, 32, 64, 128, 256
XD = 1 << 63
# #PF error code bits (SDM 4.7).
EC_P, EC_W, EC_U, EC_RSVD, EC_ID, EC_PK = 1, 2, 4, 8, 16, 32
PF, GP = 14, 13

RO_FLAG = 2          # KVM_MEM_READONLY


def bits(hi: int, lo: int) -> int:
    return 0 if hi < lo else ((1 << (hi - lo + 1)) - 1) << lo


# ------------------------------------------------------------------------------------------------
# Guest-physical memory and the memslot map.
@dataclass
class Slot:
    id: int
    gpa: int
    size: int
    flags: int
    hva: int

    @property
    def readonly(self) -> bool:
        return bool(self.flags & RO_FLAG)

    def contains(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size


class Phys:
    """Backing pages by hva, and the slot map of one VM's address space 0."""

    def __init__(self) -> None:
        self.slots: dict[int, Slot] = {}
        self.pages: dict[int, bytearray] = {}

    def slot_at(self, gpa: int) -> Slot | None:
        for s in self.slots.values():
            if s.contains(gpa):
                return s
        return None

    def hva(self, gpa: int) -> int | None:
        s = self.slot_at(gpa)
        return None if s is None else s.hva + (gpa - s.gpa)

    def _page(self, hva: int) -> bytearray:
        pg = self.pages.get(hva >> 12)
        if pg is None:
            pg = self.pages[hva >> 12] = bytearray(PAGE)
        return pg

    def read_hva(self, hva: int, n: int) -> bytes:
        pg = self.pages.get(hva >> 12)
        off = hva & 0xFFF
        return bytes(n) if pg is None else bytes(pg[off:off + n])

    def write_hva(self, hva: int, data: bytes) -> None:
        off = hva & 0xFFF
        self._page(hva)[off:off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes | None:
        """n bytes inside one page at gpa, or None when no memslot backs it."""
        h = self.hva(gpa)
        return None if h is None else self.read_hva(h, n)

    def write(self, gpa: int, data: bytes) -> None:
        h = self.hva(gpa)
        assert h is not None, f"reference write to unbacked gpa {gpa:#x}"
        self.write_hva(h, data)

    def read_int(self, gpa: int, size: int) -> int | None:
        b = self.read(gpa, size)
        return None if b is None else int.from_bytes(b, "little")

    def table_writable(self, gpa: int) -> bool:
        s = self.slot_at(gpa)
        return s is not None and not s.readonly


# ------------------------------------------------------------------------------------------------
# Architectural vCPU state.
MODE_LEVELS = {"nonpaging": 0, "32bit": 2, "pae": 3, "4level": 4, "5level": 5}


@dataclass
class Regs:
    mode: str = "nonpaging"
    cr3: int = 0
    wp: bool = False
    smep: bool = False
    smap: bool = False
    pke: bool = False
    pge: bool = False
    pse: bool = False
    nxe: bool = False
    ac: bool = False
    pkru: int = 0
    pdptrs: tuple[int, ...] = (0, 0, 0, 0)

    @property
    def esize(self) -> int:
        return 4 if self.mode == "32bit" else 8

    @property
    def la_bits(self) -> int:
        return {"4level": 48, "5level": 57}.get(self.mode, 32)

    @property
    def has_nx(self) -> bool:
        return self.mode in ("pae", "4level", "5level") and self.nxe

    @property
    def pk_active(self) -> bool:
        return self.pke and self.mode in ("4level", "5level")


def canonical(addr: int, la_bits: int) -> bool:
    top = addr >> (la_bits - 1)
    return top == 0 or top == (1 << (65 - la_bits)) - 1


def pae_pdpte_reserved(pdpte: int, maxphyaddr: int) -> bool:
    """SDM 4.4.1: a present PDPTE with bits 2:1, 8:5, 63 or 62:MAXPHYADDR set makes MOV CR3 #GP."""
    return bool(pdpte & P and pdpte & (XD | bits(62, maxphyaddr) | bits(8, 5) | bits(2, 1)))


# ------------------------------------------------------------------------------------------------
# Translations (what a TLB entry holds) and walks.
@dataclass(frozen=True)
class Tr:
    base: int          # linear address of the page (aligned to size)
    size: int
    frame: int         # guest-physical address of the page
    w: bool
    u: bool
    x: bool
    pkey: int
    dirty: bool
    glob: bool

    def gpa(self, gva: int) -> int:
        return self.frame + (gva - self.base)

    def covers(self, gva: int) -> bool:
        return self.base <= gva < self.base + self.size


@dataclass
class Walk:
    """A structural walk: the path read, and either a leaf translation or the fault it hit."""

    path: list[tuple[int, int, int]] = field(default_factory=list)   # (entry gpa, value, level), top down
    fault: int | None = None       # EC_P / EC_RSVD bits of a structural fault (0 = not present)
    tr: Tr | None = None
    leaf_gpa: int = -1
    unbacked: bool = False         # the fault is a table the walk could not read (no memslot)


def _rsvd(regs: Regs, level: int, entry: int, large: bool, maxphyaddr: int) -> bool:
    mode = regs.mode
    if mode == "32bit":
        return bool(large and entry & bits(21, 17))      # PSE-36 as KVM models it (bits 16:13 = PA 35:32)
    nx = 0 if regs.nxe else XD
    if mode == "pae":
        high = bits(62, maxphyaddr)
        if level == 2 and large:
            return bool(entry & (high | nx | bits(20, 13)))
        return bool(entry & (high | nx))
    high = bits(51, maxphyaddr)
    if level >= 4:
        return bool(entry & (high | nx | PS))
    if large:
        return bool(entry & (high | nx | (bits(29, 13) if level == 3 else bits(20, 13))))
    return bool(entry & (high | nx))


def walk(regs: Regs, phys: Phys, gva: int, maxphyaddr: int) -> Walk:
    """Read the guest's tables for gva (no permission check, no A/D update)."""
    w = Walk()
    mode = regs.mode
    esize = regs.esize
    if mode == "nonpaging":
        w.tr = Tr(gva & ~0xFFF, KiB4, gva & ~0xFFF, True, True, True, 0, True, False)
        return w
    wr, us, x = True, True, True
    if mode == "32bit":
        level, table = 2, regs.cr3 & 0xFFFFF000
        shift_of = {2: 22, 1: 12}
        imask = 0x3FF
    else:
        shift_of = {5: 48, 4: 39, 3: 30, 2: 21, 1: 12}
        imask = 0x1FF
        if mode == "pae":
            pdpte = regs.pdptrs[(gva >> 30) & 3]
            w.path.append((-1, pdpte, 3))         # a register, not memory: never written
            if not pdpte & P:
                w.fault = 0
                return w
            table, level = pdpte & bits(51, 12), 2
        else:
            level = MODE_LEVELS[mode]
            table = regs.cr3 & bits(51, 12)
    while True:
        egpa = table + esize * ((gva >> shift_of[level]) & imask)
        entry = phys.read_int(egpa, esize)
        if entry is None:                  # no memslot behind the table: KVM injects #PF(P=0)
            w.fault = 0
            w.unbacked = True
            return w
        w.path.append((egpa, entry, level))
        if not entry & P:
            w.fault = 0
            return w
        large = False
        if entry & PS:
            if mode == "32bit":
                large = level == 2 and regs.pse
            else:
                large = level in (2, 3)
        if _rsvd(regs, level, entry, large, maxphyaddr):
            w.fault = EC_P | EC_RSVD
            return w
        wr &= bool(entry & RW)
        us &= bool(entry & US)
        if regs.has_nx and entry & XD:
            x = False
        if level == 1 or large:
            break
        table = entry & (0xFFFFF000 if esize == 4 else bits(51, 12))
        level -= 1
    if level == 1:
        size = KiB4
        frame = entry & (0xFFFFF000 if esize == 4 else bits(51, 12))
    elif mode == "32bit":
        size = MiB4
        frame = (entry & 0xFFC00000) | (((entry >> 13) & 0xF) << 32)
    else:
        size = MiB2 if level == 2 else GiB1
        frame = entry & bits(51, 12) & ~(size - 1)
    pkey = (entry >> 59) & 0xF if mode in ("4level", "5level") else 0
    glob = bool(entry & G) and regs.pge
    w.leaf_gpa = egpa
    w.tr = Tr(gva & ~(size - 1) & U64, size, frame, wr, us, x, pkey, bool(entry & D), glob)
    return w


@dataclass(frozen=True)
class Access:
    gva: int
    size: int
    kind: str            # read | write | fetch
    cpl: int
    implicit: bool
    value: int = 0       # for writes

    @property
    def write(self) -> bool:
        return self.kind == "write"

    @property
    def fetch(self) -> bool:
        return self.kind == "fetch"

    @property
    def user(self) -> bool:
        return self.cpl == 3 and not self.implicit


def access_bits(regs: Regs, acc: Access) -> int:
    """The W/U/I-D part of a #PF error code for this access."""
    code = (EC_W if acc.write else 0) | (EC_U if acc.user else 0)
    if acc.fetch and (regs.smep or regs.has_nx):
        code |= EC_ID
    return code


def permission_fault(regs: Regs, tr: Tr, acc: Access) -> int:
    """0 if the translation allows the access under the current registers, else EC_P (| EC_PK)."""
    if regs.mode == "nonpaging":
        return 0
    bad = False
    if acc.user:
        bad = not tr.u or (acc.write and not tr.w) or (acc.fetch and not tr.x)
    else:
        if acc.write and not tr.w and regs.wp:
            bad = True
        if acc.fetch and (not tr.x or (regs.smep and tr.u)):
            bad = True
        if regs.smap and tr.u and not acc.fetch and (acc.implicit or not regs.ac):
            bad = True
    code = EC_P if bad else 0
    if regs.pk_active and tr.u and not acc.fetch:
        k = (regs.pkru >> (2 * tr.pkey)) & 3
        if k & 1 or (k & 2 and acc.write and (acc.user or regs.wp)):
            code = EC_P | EC_PK
    return code


# ------------------------------------------------------------------------------------------------
# Effects and outcomes.
@dataclass(frozen=True)
class Exit:
    gpa: int
    len: int
    is_write: bool
    data: bytes


@dataclass
class Outcome:
    """One architecturally allowed result of an access, with what it does to memory and the TLB."""

    value: int | None = None
    fault: tuple[int, int, int | None] | None = None        # (vector, error code, cr2)
    mmio_exit_records: list[Exit] = field(default_factory=list)
    ad: dict[int, tuple[int, int]] = field(default_factory=dict)   # entry gpa -> (size, bits to OR)
    data: list[tuple[int, bytes]] = field(default_factory=list)   # (gpa, bytes) written to RAM
    fills: list[Tr] = field(default_factory=list)                   # translations now possibly cached
    fault_gva: int | None = None                                    # #PF: invalidate this address
    how: str = ""                                                   # which options made it (for messages)

    def observable(self) -> tuple:
        return (self.value, self.fault, tuple(self.mmio_exit_records))


def mmio_read_value(gpa: int, n: int) -> int:
    """What the fuzzer's VMM device answers to an n-byte KVM_EXIT_MMIO read at gpa."""
    v = (gpa * 0x9E3779B97F4A7C15 + n * 0x1234567) & U64
    return (v ^ (v >> 29)) & ((1 << (8 * n)) - 1)


def _ad_success(regs: Regs, phys: Phys, w: Walk, write: bool) -> dict[int, tuple[int, int]]:
    need: dict[int, int] = {}
    for egpa, entry, _level in w.path:
        if egpa < 0 or not phys.table_writable(egpa):
            continue
        bit = A | (D if write and egpa == w.leaf_gpa else 0)
        need[egpa] = need.get(egpa, 0) | (bit & ~entry)
    return {g: (regs.esize, b) for g, b in need.items() if b}


def _ad_fault_prefixes(regs: Regs, phys: Phys, w: Walk, policy: str) -> list[dict[int, tuple[int, int]]]:
    """The A-bit effects a faulting walk may leave under the policy (see the module docstring)."""
    if policy == "kvm":
        return [{}]
    esize = regs.esize
    path = w.path
    if w.tr is not None or not w.unbacked:
        path = path[:-1]              # the leaf, or the entry the walk stopped at, is not passed
    nonleaf = [(g, e) for g, e, _lv in path if g >= 0]
    out = [{}]
    cur: dict[int, tuple[int, int]] = {}
    for g, e in nonleaf:
        if not phys.table_writable(g):
            if e & A:
                continue              # nothing to write there: the CPU goes on
            break                     # the CPU cannot set A here: KVM's emulator finishes the walk
        if not e & A:
            cur = dict(cur)
            cur[g] = (esize, A)
            out.append(cur)
    return out


@dataclass
class PieceOpt:
    fault: int | None              # full error code when this piece faults
    tr: Tr | None
    ad: dict[int, tuple[int, int]]
    fresh: bool


class VcpuRef:
    """One vCPU: registers and the possible TLB."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.regs = Regs()
        self.tlb: dict[tuple[int, int], set[Tr]] = {}

    # -- TLB latitude -----------------------------------------------------------------------------
    def cached(self, gva: int) -> list[Tr]:
        out: list[Tr] = []
        for size in (KiB4, MiB2, MiB4, GiB1):
            out.extend(self.tlb.get((gva & ~(size - 1), size), ()))
        return out

    def fill(self, tr: Tr) -> None:
        if self.regs.mode == "nonpaging":
            return
        self.tlb.setdefault((tr.base, tr.size), set()).add(tr)

    def invlpg(self, gva: int) -> None:
        for size in (KiB4, MiB2, MiB4, GiB1):
            self.tlb.pop((gva & ~(size - 1), size), None)

    def flush(self, keep_global: bool = False) -> None:
        if not keep_global:
            self.tlb.clear()
            return
        for key in list(self.tlb):
            kept = {t for t in self.tlb[key] if t.glob}
            if kept:
                self.tlb[key] = kept
            else:
                del self.tlb[key]


class Reference:
    """One VM's reference: memory, memslots, vCPUs."""

    def __init__(self, maxphyaddr: int, policy: str) -> None:
        self.maxphyaddr = maxphyaddr
        self.policy = policy
        self.phys = Phys()
        self.vcpus: list[VcpuRef] = []

    # -- accesses -----------------------------------------------------------------------------------
    def pieces(self, gva: int, size: int) -> list[tuple[int, int]]:
        first = PAGE - (gva & 0xFFF)
        if first >= size:
            return [(gva, size)]
        return [(gva, first), ((gva + first) & U64, size - first)]

    def address_check(self, v: VcpuRef, acc: Access) -> str | None:
        """'invalid' (an API error), 'gp' (#GP) or None."""
        regs = v.regs
        if regs.la_bits == 32:
            if acc.gva >> 32:
                return "invalid"
            if acc.gva + acc.size > 1 << 32:
                return "gp"           # beyond the 4 GiB flat segment limit
            return None
        last = (acc.gva + acc.size - 1) & U64
        if not canonical(acc.gva, regs.la_bits) or not canonical(last, regs.la_bits):
            return "gp"
        return None

    def piece_options(self, v: VcpuRef, gva: int, acc: Access) -> list[PieceOpt]:
        regs = v.regs
        opts: list[PieceOpt] = []
        w = walk(regs, self.phys, gva, self.maxphyaddr)
        extra = access_bits(regs, acc)
        if w.tr is None:
            for ad in _ad_fault_prefixes(regs, self.phys, w, self.policy):
                opts.append(PieceOpt(w.fault | extra, None, ad, True))
        else:
            perm = permission_fault(regs, w.tr, acc)
            if perm:
                for ad in _ad_fault_prefixes(regs, self.phys, w, self.policy):
                    opts.append(PieceOpt(perm | extra, None, ad, True))
            else:
                ad = _ad_success(regs, self.phys, w, acc.write)
                tr = w.tr if not acc.write else replace(w.tr, dirty=True)
                if not acc.write and ad.get(w.leaf_gpa, (0, 0))[1] & D:
                    tr = replace(tr, dirty=True)
                opts.append(PieceOpt(None, tr, ad, True))
        if regs.mode == "nonpaging":
            return opts
        for tr in v.cached(gva):
            if acc.write and not tr.dirty:
                continue                      # a write through a clean entry walks to set D
            perm = permission_fault(regs, tr, acc)
            opts.append(PieceOpt(perm | extra if perm else None, None if perm else tr, {}, False))
        return opts

    def outcomes(self, v: VcpuRef, acc: Access) -> list[Outcome]:
        pieces = self.pieces(acc.gva, acc.size)
        per_piece = [self.piece_options(v, g, acc) for g, _n in pieces]
        outs: list[Outcome] = []
        orders = [list(range(len(pieces)))]
        if len(pieces) == 2:
            orders.append([1, 0])
        for order in orders:
            self._combine(v, acc, pieces, per_piece, order, 0, [None] * len(pieces), outs)
        return outs

    def _combine(self, v: VcpuRef, acc: Access, pieces: list[tuple[int, int]], per_piece: list[list[PieceOpt]],
                 order: list[int], depth: int, chosen: list[PieceOpt | None], outs: list[Outcome]) -> None:
        if depth == len(order):
            outs.append(self._finish(v, acc, pieces, chosen))
            return
        i = order[depth]
        for opt in per_piece[i]:
            chosen[i] = opt
            if opt.fault is not None:
                done = [chosen[j] for j in order[:depth + 1]]
                outs.append(self._fault_outcome(pieces[i][0], opt, [c for c in done if c is not None]))
            else:
                self._combine(v, acc, pieces, per_piece, order, depth + 1, chosen, outs)
            chosen[i] = None

    @staticmethod
    def _merge_ad(opts: Iterable[PieceOpt]) -> dict[int, tuple[int, int]]:
        ad: dict[int, tuple[int, int]] = {}
        for o in opts:
            for g, (size, b) in o.ad.items():
                ad[g] = (size, ad.get(g, (size, 0))[1] | b)
        return ad

    def _fault_outcome(self, gva: int, opt: PieceOpt, done: list[PieceOpt]) -> Outcome:
        out = Outcome(fault=(PF, opt.fault & 0xFFFF, gva), ad=self._merge_ad(done), fault_gva=gva)
        out.fills = [o.tr for o in done if o.tr is not None]
        out.how = "fault " + ("walk" if opt.fresh else "stale tlb")
        return out

    def _finish(self, v: VcpuRef, acc: Access, pieces: list[tuple[int, int]], chosen: list[PieceOpt | None]) -> Outcome:
        opts = [c for c in chosen if c is not None]
        out = Outcome(ad=self._merge_ad(opts))
        out.fills = [o.tr for o in opts if o.tr is not None]
        out.how = "+".join("walk" if o.fresh else "tlb" for o in opts)
        # Memory as the data access sees it: after this access's own A/D updates.
        shadow = _Overlay(self.phys, out.ad)
        data = acc.value.to_bytes(acc.size, "little") if acc.write else b""
        got = b""
        pos = 0
        for (pg, n), opt in zip(pieces, opts, strict=True):
            gpa = opt.tr.gpa(pg)
            slot = self.phys.slot_at(gpa)
            if slot is not None and not (acc.write and slot.readonly):
                if acc.write:
                    out.data.append((gpa, data[pos:pos + n]))
                else:
                    got += shadow.read(gpa, n)
            else:
                off = 0
                while off < n:
                    k = min(8, n - off)
                    if acc.write:
                        out.mmio_exit_records.append(Exit(gpa + off, k, True, data[pos + off:pos + off + k]))
                    else:
                        val = mmio_read_value(gpa + off, k)
                        b = val.to_bytes(k, "little")
                        out.mmio_exit_records.append(Exit(gpa + off, k, False, b))
                        got += b
                    off += k
            pos += n
        if not acc.write:
            out.value = int.from_bytes(got, "little")
        return out

    def speculative_fill(self, gvas: Iterable[int]) -> None:
        """Every vCPU may cache, at any time, any valid translation whose entries all have A=1."""
        for v in self.vcpus:
            if v.regs.mode == "nonpaging":
                continue
            for gva in gvas:
                if v.regs.la_bits == 32 and gva >> 32:
                    continue
                if v.regs.la_bits > 32 and not canonical(gva, v.regs.la_bits):
                    continue
                w = walk(v.regs, self.phys, gva, self.maxphyaddr)
                if w.tr is not None and all(g < 0 or e & A for g, e, _lv in w.path):
                    v.fill(w.tr)


class _Overlay:
    """Reads of guest memory with a set of A/D bits OR-ed in (not yet committed)."""

    def __init__(self, phys: Phys, ad: dict[int, tuple[int, int]]) -> None:
        self.phys, self.ad = phys, ad

    def read(self, gpa: int, n: int) -> bytes:
        buf = bytearray(self.phys.read(gpa, n) or bytes(n))
        for g, (size, b) in self.ad.items():
            for i in range(size):
                a = g + i
                if gpa <= a < gpa + n:
                    buf[a - gpa] |= (b >> (8 * i)) & 0xFF
        return bytes(buf)
