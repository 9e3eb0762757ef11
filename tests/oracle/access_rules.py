"""An independent oracle for one x86 data or instruction access through the paging structures.

Written from the rules in docs/spec/x86-access.md (section 2, "expected-outcome rules", and section 5,
"architecture facts", which cite the Intel SDM Vol. 3A chapter 4).  It imports nothing from kvmmu: the
bit positions, the reserved-bit rules, the permission rules and the error-code rules are restated
here, deliberately in a different shape from the walker (a rule-by-rule walk over a dict of entries,
no precomputed tables), so that the two can be compared.

A *case* is one set of flags in the spirit of kvm-unit-tests ``access``: the PTE/PDE bits, the
PDPTE's R/W, the kind of access, and the CPU controls (CR0.WP, EFER.NXE, CR4.SMEP/SMAP/PKE/PSE,
EFLAGS.AC, PKRU).  Every entry above the PDE is fixed (present, writable, user; PAE PDPTEs have no
permission bits at all), as in the test.

For a case the oracle gives:
  * `layout(case, write)`: the page tables written through any ``write(addr, size, value)``
    (a SparseMemory, or a guest writing its own tables through a vCPU), returning
    ``(root, la, pte_addr, pde_addr)``;
  * `expected(case)`: fault or not, the exact #PF error code, and the exact value of every paging
    entry after the access (PTE and PDE, and the upper levels too) under the case's A/D policy;
  * `cpu_state(case)`, `pfec(case)`: CR0/CR4/EFER/RFLAGS/PKRU/CPL, and the access as PFERR bits.

A/D policies (`Case.ad_policy`):
  * ``"kvm"``: A and D are written only when the access succeeds (KVM's software walker; the design
    brief reports this measured on the real /dev/kvm): A on every entry used, D on the leaf for a
    write.  A faulting walk changes nothing.
  * ``"hardware"``: A is set on every non-leaf entry the walk has passed (present, no reserved bit)
    even if the walk faults further down; the leaf's A (and D for a write) only on success.
  PAE PDPTEs have no A bit and are never written.  D in a non-leaf entry is an ignored bit and is
  never written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cache
from typing import NamedTuple


def _bits(hi: int, lo: int) -> int:
    """Bits hi..lo inclusive (empty when hi < lo)."""
    return 0 if hi < lo else ((1 << (hi - lo + 1)) - 1) << lo


# ------------------------------------------------------------------------------------------------
# The case flags.  Bit positions are positions in the case integer, not in any entry.
FLAG_NAMES: tuple[str, ...] = (
    "pte.rw", "pte.user", "pte.a", "pte.d", "pte.nx", "pte.p", "pte.51", "pte.36",
    "pde.rw", "pde.user", "pde.a", "pde.d", "pde.pse", "pde.nx", "pde.p",
    "pde.51", "pde.36", "pde.13", "pde.21",
    "pdpte.ro", "pkru.ad", "pkru.wd", "pkey",
    "user", "write", "fetch", "implicit", "twice",
    "efer.nx", "cr0.wp", "cr4.smep", "cr4.smap", "eflags.ac", "cr4.pke", "cr4.pse",
)
FLAG: dict[str, int] = {name: 1 << i for i, name in enumerate(FLAG_NAMES)}

PTE_RW = FLAG["pte.rw"]
PTE_USER = FLAG["pte.user"]
PTE_A = FLAG["pte.a"]
PTE_D = FLAG["pte.d"]
PTE_NX = FLAG["pte.nx"]
PTE_P = FLAG["pte.p"]
PTE_51 = FLAG["pte.51"]          # PTE bit 51: reserved when MAXPHYADDR <= 51
PTE_36 = FLAG["pte.36"]          # PTE bit 36: reserved when MAXPHYADDR <= 36
PDE_RW = FLAG["pde.rw"]
PDE_USER = FLAG["pde.user"]
PDE_A = FLAG["pde.a"]
PDE_D = FLAG["pde.d"]            # D of a large PDE; an ignored bit in a non-leaf PDE
PDE_PSE = FLAG["pde.pse"]        # PDE bit 7
PDE_NX = FLAG["pde.nx"]
PDE_P = FLAG["pde.p"]
PDE_51 = FLAG["pde.51"]
PDE_36 = FLAG["pde.36"]
PDE_13 = FLAG["pde.13"]          # reserved in a 2 MiB PDE (bits 20:13)
PDE_21 = FLAG["pde.21"]          # reserved in a 32-bit 4 MiB PDE (bits 21:17 with PSE-36)
PDPTE_RO = FLAG["pdpte.ro"]      # clear R/W in the (4-/5-level) PDPTE
PKRU_AD = FLAG["pkru.ad"]        # PKRU.AD for key 1
PKRU_WD = FLAG["pkru.wd"]        # PKRU.WD for key 1
PKEY = FLAG["pkey"]              # leaf key 1; a non-leaf PDE gets key 2 (must be ignored)
USER = FLAG["user"]              # CPL3
WRITE = FLAG["write"]
FETCH = FLAG["fetch"]
IMPLICIT = FLAG["implicit"]      # an implicit supervisor access (GDT/IDT/TSS...), at CPL0 here
TWICE = FLAG["twice"]            # a supervisor read of the same address first
EFER_NX = FLAG["efer.nx"]
CR0_WP = FLAG["cr0.wp"]
CR4_SMEP = FLAG["cr4.smep"]
CR4_SMAP = FLAG["cr4.smap"]
EFLAGS_AC = FLAG["eflags.ac"]
CR4_PKE = FLAG["cr4.pke"]
CR4_PSE = FLAG["cr4.pse"]        # 32-bit paging only: PS in a PDE maps a 4 MiB page

MODES = ("32bit", "pae", "4level", "5level")
AD_POLICIES = ("kvm", "hardware")


class Case(NamedTuple):
    mode: str
    flags: int
    maxphyaddr: int = 46
    ad_policy: str = "kvm"
    # Protection keys beyond access.c's fixed values: `key` is the leaf's key (bits 62:59; the
    # non-leaf PDE then gets key ^ 0xF, which must be ignored) instead of the PKEY flag, and
    # `pkru_value` is PKRU instead of pkru()'s choice.
    key: int | None = None
    pkru_value: int | None = None
    # An access made first (same CPU state), as (cpl, kind) with kind "read"/"write"/"fetch"; its A/D
    # updates are kept.  The TWICE flag is prior=(0, "read").
    prior: tuple[int, str] | None = None

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def __str__(self) -> str:
        names = [n for n in FLAG_NAMES if self.flags & FLAG[n]]
        extra = "".join(f" {n}={v!r}" for n, v in (("key", self.key), ("pkru", self.pkru_value),
                                                   ("prior", self.prior)) if v is not None)
        return (f"{self.mode} maxphyaddr={self.maxphyaddr} ad={self.ad_policy} "
                f"[{' '.join(names) or '-'}]{extra}")


def make_case(mode: str, names: Iterable[str] = (), **kw: object) -> Case:
    """Case from flag names, e.g. make_case("4level", ["pte.p", "pde.p", "write"])."""
    flags = 0
    for name in names:
        flags |= FLAG[name]
    return Case(mode, flags, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Entry bits (SDM Vol. 3A, 4.3-4.5) and error-code bits (SDM 4.7).
P, RW, US, ACC, DIRTY, PS = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
XD = 1 << 63
EC_P, EC_W, EC_U, EC_RSVD, EC_ID, EC_PK = 1, 2, 4, 8, 16, 32

# Register bits for cpu_state().
CR0_PE_BIT, CR0_WP_BIT, CR0_PG_BIT = 1 << 0, 1 << 16, 1 << 31
CR4_PSE_BIT, CR4_PAE_BIT, CR4_LA57_BIT = 1 << 4, 1 << 5, 1 << 12
CR4_SMEP_BIT, CR4_SMAP_BIT, CR4_PKE_BIT = 1 << 20, 1 << 21, 1 << 22
EFER_LME_BIT, EFER_LMA_BIT, EFER_NXE_BIT = 1 << 8, 1 << 10, 1 << 11
RFLAGS_AC_BIT = 1 << 18
# The walker API's access bits (PFERR_*), for pfec().
PFERR_W, PFERR_U, PFERR_F, PFERR_IMPLICIT = 1 << 1, 1 << 2, 1 << 4, 1 << 48

# ------------------------------------------------------------------------------------------------
# Where things live (as in access.c: the data frame at 32 MiB, tables in a pool at 33 MiB).
FRAME = 32 << 20
POOL = 33 << 20
LA64 = 0xFFFF_9234_0012_3000     # upper half; canonical for 4- and 5-level paging
LA32 = 0x9234_5000               # nonzero indexes at every level, inside a large page too

_LEVELS = {"32bit": (2, 1), "pae": (3, 2, 1), "4level": (4, 3, 2, 1), "5level": (5, 4, 3, 2, 1)}


def levels(mode: str) -> tuple[int, ...]:
    """The levels a walk in `mode` reads, top first (1 = the 4 KiB page table)."""
    return _LEVELS[mode]


def entry_size(mode: str) -> int:
    return 4 if mode == "32bit" else 8


def linear_address(mode: str) -> int:
    return LA32 if mode in ("32bit", "pae") else LA64


def table_address(mode: str, level: int) -> int:
    """Base of the table holding the level-`level` entry (PAE's PDPT is only 32-byte aligned)."""
    top = _LEVELS[mode][0]
    if mode == "pae" and level == 3:
        return POOL + 0x20
    return POOL + 0x1000 * (top - level)


def root(mode: str) -> int:
    """CR3: the top table (the PDPT for PAE, at CR3 & ~0x1f)."""
    return table_address(mode, _LEVELS[mode][0])


def index(mode: str, level: int, la: int) -> int:
    if mode == "32bit":
        return (la >> 22) & 0x3FF if level == 2 else (la >> 12) & 0x3FF
    if mode == "pae" and level == 3:
        return (la >> 30) & 3
    return (la >> (12 + 9 * (level - 1))) & 0x1FF


def entry_addresses(mode: str) -> dict[int, int]:
    """Physical address of the entry used at each level for this mode's linear address."""
    la = linear_address(mode)
    esz = entry_size(mode)
    return {lvl: table_address(mode, lvl) + esz * index(mode, lvl, la) for lvl in _LEVELS[mode]}


def has_nx(mode: str) -> bool:
    """XD exists in PAE, 4-level and 5-level entries (64-bit entries), not in 32-bit paging."""
    return mode != "32bit"


def has_pkeys(mode: str) -> bool:
    """Protection keys exist only with 4-level and 5-level paging (SDM 4.6.2)."""
    return mode in ("4level", "5level")


def pde_is_leaf(case: Case) -> bool:
    """PS=1 in a PDE maps a page, except in 32-bit paging with CR4.PSE=0 where bit 7 is ignored."""
    if not case.has(PDE_PSE):
        return False
    return case.mode != "32bit" or case.has(CR4_PSE)


# ------------------------------------------------------------------------------------------------
def initial_entries(case: Case) -> dict[int, int]:
    """The value of each level's entry before the access."""
    mode = case.mode
    f = case.flags
    out: dict[int, int] = {}
    for lvl in _LEVELS[mode]:
        if lvl > 3 or (lvl == 3 and mode != "pae"):
            rights = P | RW | US
            if lvl == 3 and f & PDPTE_RO:
                rights &= ~RW
            out[lvl] = table_address(mode, lvl - 1) | rights
        elif lvl == 3:                              # PAE PDPTE: P and the address, nothing else
            out[lvl] = table_address(mode, 2) | P
    leaf_pde = pde_is_leaf(case)
    pde = FRAME | PS if leaf_pde else table_address(mode, 1)
    if f & PDE_PSE:
        pde |= PS                                   # ignored without CR4.PSE in 32-bit paging
    pde |= _flag_bits(f, ((PDE_P, P), (PDE_RW, RW), (PDE_USER, US), (PDE_A, ACC), (PDE_D, DIRTY),
                          (PDE_NX, XD), (PDE_51, 1 << 51), (PDE_36, 1 << 36), (PDE_13, 1 << 13),
                          (PDE_21, 1 << 21)))
    if case.key is not None and has_pkeys(mode):
        pde |= (case.key if leaf_pde else case.key ^ 0xF) << 59
    elif f & PKEY:
        pde |= (1 if leaf_pde else 2) << 59
    pte = FRAME | _flag_bits(f, ((PTE_P, P), (PTE_RW, RW), (PTE_USER, US), (PTE_A, ACC), (PTE_D, DIRTY),
                                 (PTE_NX, XD), (PTE_51, 1 << 51), (PTE_36, 1 << 36)))
    if case.key is not None and has_pkeys(mode):
        pte |= case.key << 59
    elif f & PKEY:
        pte |= 1 << 59
    out[2] = pde
    out[1] = pte
    return out


def _flag_bits(flags: int, pairs: tuple[tuple[int, int], ...]) -> int:
    v = 0
    for flag, bit in pairs:
        if flags & flag:
            v |= bit
    return v


class Layout(NamedTuple):
    root: int
    la: int
    pte_addr: int
    pde_addr: int


def layout(case: Case, write: Callable[[int, int, int], object]) -> Layout:
    """Write the case's paging entries through `write(addr, size, value)`.

    Only the entries on the walk's path are written; the rest of each table is left as it is (zero
    in fresh memory).  The PTE is written even when the PDE maps a large page (it must then stay
    untouched).  The data frame is at FRAME; nothing is written there.
    """
    addrs = entry_addresses(case.mode)
    esz = entry_size(case.mode)
    for lvl, value in initial_entries(case).items():
        write(addrs[lvl], esz, value)
    return Layout(root(case.mode), linear_address(case.mode), addrs[1], addrs[2])


def pkru(case: Case) -> int:
    """PKRU as access.c sets it, plus a deny-all value where keys must have no effect.

    CR4.PKE=1 with keys: 0x30 (key 2 AD=WD=1) | WD(key 1) << 3 | AD(key 1) << 2.
    CR4.PKE=0: 0xFFFFFFFC, denying every key but 0 (PKRU must then be ignored).
    CR4.PKE=1 in a mode without keys (32-bit, PAE): 0xFFFFFFFF (must be ignored too).
    """
    if case.pkru_value is not None:
        return case.pkru_value
    if not case.has(CR4_PKE):
        return 0xFFFFFFFC
    if not has_pkeys(case.mode):
        return 0xFFFFFFFF
    return 0x30 | (8 if case.has(PKRU_WD) else 0) | (4 if case.has(PKRU_AD) else 0)


def pfec(case: Case) -> int:
    """The access as PFERR_* bits (an implicit access is a supervisor access: no U)."""
    code = 0
    if case.has(WRITE):
        code |= PFERR_W
    if case.has(FETCH):
        code |= PFERR_F
    if case.has(IMPLICIT):
        code |= PFERR_IMPLICIT
    elif case.has(USER):
        code |= PFERR_U
    return code


class CpuState(NamedTuple):
    cr0: int
    cr3: int
    cr4: int
    efer: int
    rflags: int
    pkru: int
    cpl: int


def cpu_state(case: Case) -> CpuState:
    """Control registers that select the case's paging mode and CPU flags."""
    mode = case.mode
    cr0 = CR0_PE_BIT | CR0_PG_BIT | (CR0_WP_BIT if case.has(CR0_WP) else 0)
    cr4 = 0
    efer = EFER_NXE_BIT if case.has(EFER_NX) else 0
    if mode != "32bit":
        cr4 |= CR4_PAE_BIT
    if mode in ("4level", "5level"):
        efer |= EFER_LME_BIT | EFER_LMA_BIT
    if mode == "5level":
        cr4 |= CR4_LA57_BIT
    for flag, bit in ((CR4_SMEP, CR4_SMEP_BIT), (CR4_SMAP, CR4_SMAP_BIT), (CR4_PKE, CR4_PKE_BIT),
                      (CR4_PSE, CR4_PSE_BIT)):
        if case.has(flag):
            cr4 |= bit
    rflags = 2 | (RFLAGS_AC_BIT if case.has(EFLAGS_AC) else 0)
    cpl = 3 if case.has(USER) and not case.has(IMPLICIT) else 0
    return CpuState(cr0, root(mode), cr4, efer, rflags, pkru(case), cpl)


# ------------------------------------------------------------------------------------------------
# The rules.
def reserved_bits(case: Case, level: int, large: bool) -> int:
    """Bits that must be 0 in a present entry at `level` (SDM 4.x "reserved bits"; rules 5.6).

    large: the entry has PS=1 and maps a page.
    """
    mode, m = case.mode, case.maxphyaddr
    if mode == "32bit":
        # 4 KiB PTEs and non-leaf PDEs have no reserved bits.  A 4 MiB PDE with PSE-36 (as KVM
        # models it): bits 16:13 are physical-address bits 35:32 and bits 21:17 are reserved.
        return _bits(21, 17) if level == 2 and large else 0
    nx = 0 if case.has(EFER_NX) else XD                 # XD is reserved while EFER.NXE=0
    if mode == "pae":
        if level == 3:                                  # PDPTE: 63, 62:M, 8:5, 2:1
            return XD | _bits(62, m) | _bits(8, 5) | _bits(2, 1)
        mask = _bits(62, m) | nx
        if level == 2 and large:
            mask |= _bits(20, 13)                       # 2 MiB PDE: address bits 20:13 reserved
        return mask
    mask = _bits(51, m) | nx
    if level >= 4:
        mask |= PS                                      # PS is reserved in PML4E and PML5E
    elif level == 3 and large:
        mask |= _bits(29, 13)                           # 1 GiB page
    elif level == 2 and large:
        mask |= _bits(20, 13)
    return mask


def _is_leaf(case: Case, level: int, entry: int) -> bool:
    if level == 1:
        return True
    if not entry & PS:
        return False
    if level == 2:
        return case.mode != "32bit" or case.has(CR4_PSE)
    return level == 3 and case.mode in ("4level", "5level")


class _Walk(NamedTuple):
    fault: bool
    error_code: int
    a_levels: tuple[int, ...]     # entries that get A
    d_level: int                  # entry that gets D (0: none)
    leaf_level: int
    gpa: int | None


def rights(*, cpl3: bool, write: bool, fetch: bool, implicit: bool, user_page: bool, writable: bool,
           executable: bool, wp: bool, smep: bool, smap: bool, ac: bool, keys_on: bool,
           key_rights: int) -> tuple[bool, bool]:
    """(denied by the U/S, R/W, XD, SMEP, SMAP rules; denied by the protection key) for an access
    through a translation whose levels all had U/S=1 (`user_page`), R/W=1 (`writable`) and no XD
    that counts (`executable`: XD only counts with NXE).  `keys_on`: CR4.PKE in a mode with keys;
    `key_rights`: PKRU's AD (1) and WD (2) for the leaf's key.  Sections 2.4 and 5 (1-5, 8)."""
    deny = False
    if cpl3:
        # User accesses need U/S=1 at every level; writes need R/W=1 at every level.
        if not user_page or (write and not writable):
            deny = True
        if fetch and not executable:
            deny = True
    elif fetch:
        # Supervisor fetch: XD at any level; SMEP forbids fetching from a user-mode address.
        if not executable or (smep and user_page):
            deny = True
    else:
        # Supervisor data access: SMAP forbids user-mode addresses when AC=0 or the access is
        # implicit; writes need R/W=1 everywhere only when CR0.WP=1.
        if smap and user_page and (implicit or not ac):
            deny = True
        if write and wp and not writable:
            deny = True

    # Protection keys: 4/5-level with CR4.PKE, data accesses to user-mode addresses, leaf key only;
    # AD blocks reads and writes, WD blocks writes at CPL3 (or CPL<3 with CR0.WP=1).  Checked on
    # top of the other rules: PK is reported together with a R/W or U/S violation.
    pk = False
    if keys_on and user_page and not fetch and (key_rights & 1 or (key_rights & 2 and write and (cpl3 or wp))):
        pk = True
    return deny, pk


def _access(case: Case, entries: dict[int, int], *, user: bool, write: bool, fetch: bool,
            implicit: bool) -> _Walk:
    """One access by the rules of sections 2 and 5."""
    mode = case.mode
    hardware = case.ad_policy == "hardware"
    cpl3 = user and not implicit                     # implicit accesses are supervisor accesses
    nx_on = has_nx(mode) and case.has(EFER_NX)
    # Error code bits that describe the access (SDM 4.7): W/R, U/S, and I/D only for a fetch with
    # SMEP=1 or with PAE-style paging and EFER.NXE=1.
    base = (EC_W if write else 0) | (EC_U if cpl3 else 0)
    if fetch and (case.has(CR4_SMEP) or nx_on):
        base |= EC_ID

    passed: list[int] = []                           # valid non-leaf entries (A under "hardware")
    user_page = writable = executable = True
    leaf_level, leaf = 0, 0
    for lvl in _LEVELS[mode]:
        e = entries[lvl]
        if not e & P:
            return _Walk(True, base, tuple(passed) if hardware else (), 0, lvl, None)
        large = _is_leaf(case, lvl, e) and lvl > 1
        if e & reserved_bits(case, lvl, large):
            return _Walk(True, base | EC_P | EC_RSVD, tuple(passed) if hardware else (), 0, lvl, None)
        if not (mode == "pae" and lvl == 3):         # PAE PDPTEs carry no access rights
            user_page = user_page and bool(e & US)
            writable = writable and bool(e & RW)
            executable = executable and not (nx_on and e & XD)
        if _is_leaf(case, lvl, e):
            leaf_level, leaf = lvl, e
            break
        if not (mode == "pae" and lvl == 3):         # PAE PDPTEs have no A bit
            passed.append(lvl)

    keys_on = has_pkeys(mode) and case.has(CR4_PKE)
    key_rights = (pkru(case) >> (2 * ((leaf >> 59) & 0xF))) & 3
    deny, pk = rights(cpl3=cpl3, write=write, fetch=fetch, implicit=implicit, user_page=user_page,
                      writable=writable, executable=executable, wp=case.has(CR0_WP), smep=case.has(CR4_SMEP),
                      smap=case.has(CR4_SMAP), ac=case.has(EFLAGS_AC), keys_on=keys_on, key_rights=key_rights)

    if deny or pk:
        code = base | EC_P | (EC_PK if pk else 0)
        return _Walk(True, code, tuple(passed) if hardware else (), 0, leaf_level, None)

    a_levels = tuple(lvl for lvl in _LEVELS[mode] if lvl >= leaf_level and not (mode == "pae" and lvl == 3))
    return _Walk(False, 0, a_levels, leaf_level if write else 0, leaf_level,
                 _gpa(case, leaf_level, leaf))


def _gpa(case: Case, level: int, leaf: int) -> int:
    la = linear_address(case.mode)
    if case.mode == "32bit":
        if level == 1:
            return (leaf & 0xFFFFF000) | (la & 0xFFF)
        # 4 MiB page: bits 31:22 of the PDE, plus PSE-36's PDE bits 16:13 as address bits 35:32.
        return (leaf & 0xFFC00000) | (((leaf >> 13) & 0xF) << 32) | (la & 0x3FFFFF)
    page_shift = 12 + 9 * (level - 1)
    return (leaf & _bits(case.maxphyaddr - 1, page_shift)) | (la & ((1 << page_shift) - 1))


class Outcome(NamedTuple):
    fault: bool
    error_code: int               # 0 without a fault
    entries: dict[int, int]       # every level's entry after the access
    gpa: int | None               # the translation, on success
    level: int                    # leaf level on success

    @property
    def pte(self) -> int:
        return self.entries[1]

    @property
    def pde(self) -> int:
        return self.entries[2]


def _apply(entries: dict[int, int], w: _Walk) -> None:
    for lvl in w.a_levels:
        entries[lvl] |= ACC
    if w.d_level:
        entries[w.d_level] |= DIRTY


def expected(case: Case) -> Outcome:
    """What the access must do: fault/error code, and every entry's value afterwards."""
    entries = initial_entries(case)
    if case.has(TWICE):
        # A supervisor read first (same CPU state); only its A updates are kept.
        _apply(entries, _access(case, entries, user=False, write=False, fetch=False, implicit=False))
    if case.prior is not None:
        cpl, kind = case.prior
        _apply(entries, _access(case, entries, user=cpl == 3, write=kind == "write", fetch=kind == "fetch",
                                implicit=False))
    w = _access(case, entries, user=case.has(USER), write=case.has(WRITE), fetch=case.has(FETCH),
                implicit=case.has(IMPLICIT))
    _apply(entries, w)
    return Outcome(w.fault, w.error_code, entries, w.gpa, w.leaf_level)


# ------------------------------------------------------------------------------------------------
# Which combinations are meaningful (the legality filter of section 1.3, adapted to the modes).
RESERVED_FLAGS = (PTE_51, PTE_36, PDE_51, PDE_36, PDE_13, PDE_21)


@cache
def mode_flags(mode: str, maxphyaddr: int = 46) -> int:
    """Every flag that can be set in `mode` (a reserved-address flag only where that bit is reserved)."""
    f = (PTE_RW | PTE_USER | PTE_A | PTE_D | PTE_P | PDE_RW | PDE_USER | PDE_A | PDE_D | PDE_PSE | PDE_P
         | USER | WRITE | FETCH | IMPLICIT | TWICE | EFER_NX | CR0_WP | CR4_SMEP | CR4_SMAP | EFLAGS_AC
         | CR4_PKE)
    if mode == "32bit":
        return f | CR4_PSE | PDE_21
    f |= PTE_NX | PDE_NX | PDE_13
    if maxphyaddr <= 51:
        f |= PTE_51 | PDE_51
    if maxphyaddr <= 36:
        f |= PTE_36 | PDE_36
    if has_pkeys(mode):
        f |= PDPTE_RO | PKRU_AD | PKRU_WD | PKEY
    return f


def is_legal(case: Case) -> bool:
    """Section 1.3's filter, with SMEP allowed, plus SMAP/AC/implicit and the non-64-bit modes."""
    f = case.flags
    if f & ~mode_flags(case.mode, case.maxphyaddr):
        return False
    if f & WRITE and f & FETCH:
        return False
    if f & IMPLICIT and f & (USER | FETCH):          # implicit accesses are supervisor data accesses
        return False
    if f & (PKRU_AD | PKRU_WD) and not f & CR4_PKE:
        return False
    if f & (PDE_13 | PDE_21) and not pde_is_leaf(case):   # address bits of a non-leaf PDE
        return False
    rsvd = [r for r in RESERVED_FLAGS if f & r]
    if not f & EFER_NX:
        rsvd += [r for r in (PTE_NX, PDE_NX) if f & r]
    return len(rsvd) <= 1
