"""Property tests: random page tables, random control registers, every paging mode.

The walker must never crash: it translates, or reports #PF / #GP / an EPT exit, and for 32-bit
address spaces an address of 2^32 or more is an API error (InvalidArgument).  When it translates,
the translation must respect the rules (SDM 4.6 and EPT's R/W/X), checked against the entries a
small independent tracer finds on the path.  Runs are derandomized, so they are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmmu.arch import PagingContext, walk
from kvmmu.arch.bits import PFERR_FETCH_MASK, PFERR_IMPLICIT_ACCESS, PFERR_USER_MASK, PFERR_WRITE_MASK
from kvmmu.errors import InvalidArgument
from kvmmu.hw.memory import SparseMemory

ALL_MODES = ("32bit", "pae", "4level", "5level", "ept4", "ept5")
ROOT_LEVEL = {"32bit": 2, "pae": 3, "4level": 4, "5level": 5, "ept4": 4, "ept5": 5}
POOL = tuple(0x10_0000 + 0x1000 * i for i in range(6))     # where tables live
PF, GP, EPT_VIOLATION, EPT_MISCONFIG = 14, 13, 48, 49
SETTINGS = settings(max_examples=250, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def index(mode: str, level: int, addr: int) -> int:
    if mode == "32bit":
        return (addr >> (12 + 10 * (level - 1))) & 0x3FF
    if mode == "pae" and level == 3:
        return (addr >> 30) & 3
    return (addr >> (12 + 9 * (level - 1))) & 0x1FF


def table_of(mode: str, entry: int) -> int:
    return entry & (0xFFFF_F000 if mode == "32bit" else 0x000F_FFFF_FFFF_F000)


@dataclass
class Scenario:
    mode: str
    ctx_kw: dict[str, object]
    root: int
    addr: int
    access: int
    ac: bool
    pkru: int
    writes: list[tuple[int, int]]      # (address, entry value)

    @property
    def esize(self) -> int:
        return 4 if self.mode == "32bit" else 8

    def memory(self) -> SparseMemory:
        mem = SparseMemory()
        mask = (1 << (8 * self.esize)) - 1
        for addr, value in self.writes:
            mem.write(addr, self.esize, value & mask)
        return mem


@st.composite
def clean_entries(draw: st.DrawFn, ept: bool, level: int, pae_pdpte: bool = False) -> int:
    """A plausible entry: present, no reserved bit, a pool table or an aligned frame."""
    large = level in (2, 3) and draw(st.integers(0, 3)) == 0
    if large:
        shift = 21 if level == 2 else 30
        frame = draw(st.integers(0, (1 << (36 - shift)) - 1)) << shift
    elif level == 1:
        frame = draw(st.integers(0, (1 << 24) - 1)) << 12
    else:
        frame = draw(st.sampled_from(POOL))
    if ept:
        low = draw(st.sampled_from([7, 7, 5, 3, 1]))
        if level == 1 or large:
            low |= draw(st.sampled_from([6, 0, 4])) << 3 | draw(st.sampled_from([0, 0x40]))
        low |= 0x80 if large else 0
        return frame | low | draw(st.sampled_from([0, 0x100, 0x300, 1 << 63]))
    if pae_pdpte:
        return draw(st.sampled_from(POOL)) | 1 | draw(st.sampled_from([0, 0x8, 0x10, 0xE00]))
    low = 1 | draw(st.sampled_from([6, 6, 6, 2, 4, 0])) | draw(st.sampled_from([0, 0x20, 0x60, 0x18]))
    low |= draw(st.sampled_from([0, 0x100, 0xE00])) | (0x80 if large else 0)
    high = draw(st.sampled_from([0, 0, 1 << 63, 1 << 59, 0x5 << 59]))
    return frame | low | high


@st.composite
def entries(draw: st.DrawFn, ept: bool, level: int, clean: bool, pae_pdpte: bool = False) -> int:
    """An entry: mostly plausible in a `clean` scenario, often broken otherwise (random low bits,
    misaligned or unbacked frames, wholly random 64-bit values)."""
    if clean and draw(st.integers(0, 19)):
        return draw(clean_entries(ept, level, pae_pdpte))
    if draw(st.integers(0, 9)) < 3:
        return draw(st.integers(0, (1 << 64) - 1))
    frame = draw(st.sampled_from(POOL)) if draw(st.booleans()) else draw(st.integers(0, (1 << 40) - 1)) << 12
    low = draw(st.integers(0, 0xFFF))
    high = draw(st.sampled_from([0, 0, 0, 1 << 63, 1 << 59, 0x7 << 60, 1 << 52, 1 << 51]))
    return high | frame | low


@st.composite
def scenarios(draw: st.DrawFn, modes: tuple[str, ...] = ALL_MODES) -> Scenario:
    mode = draw(st.sampled_from(modes))
    ept = mode.startswith("ept")
    levels = ROOT_LEVEL[mode]
    ctx_kw: dict[str, object] = {
        "maxphyaddr": draw(st.sampled_from([46, 36, 52, 39, 32])),
        "nxe": draw(st.booleans()), "wp": draw(st.booleans()), "smep": draw(st.booleans()),
        "smap": draw(st.booleans()), "pke": draw(st.booleans()), "pse": draw(st.booleans()),
        "gbpages": draw(st.booleans()), "ad_policy": draw(st.sampled_from(["kvm", "hardware"])),
        "ept_ad": draw(st.booleans()), "ept_execonly": draw(st.booleans()),
    }
    if mode in ("32bit", "pae"):
        addr = draw(st.integers(0, (1 << 32) - 1)) if draw(st.integers(0, 9)) else \
            draw(st.integers(1 << 32, (1 << 64) - 1))
    elif ept:
        addr = draw(st.integers(0, (1 << (12 + 9 * levels)) - 1))
    else:
        bits = 48 if mode == "4level" else 57
        addr = draw(st.integers(0, (1 << (bits - 1)) - 1))
        kind = draw(st.integers(0, 9))
        if kind < 4:
            addr |= (1 << 64) - (1 << (bits - 1))                       # canonical upper half
        elif kind == 9:
            addr = draw(st.integers(0, (1 << 64) - 1))                  # almost surely not canonical
    table = draw(st.sampled_from(POOL))
    root = table | draw(st.integers(0, 0xFFF))
    if mode == "pae":
        table = root & 0xFFFF_FFE0
    writes: list[tuple[int, int]] = []
    entry_size = 4 if mode == "32bit" else 8
    clean = draw(st.integers(0, 3)) > 0
    # The path the address selects, with entries that mostly point into the pool.
    for level in range(levels, 0, -1):
        value = draw(entries(ept, level, clean, mode == "pae" and level == 3))
        writes.append((table + entry_size * index(mode, level, addr), value))
        table = table_of(mode, value)
    # Random entries at random places in the pool.
    for _ in range(draw(st.integers(0, 6))):
        where = draw(st.sampled_from(POOL)) + entry_size * draw(st.integers(0, 4096 // entry_size - 1))
        writes.append((where, draw(entries(ept, 1, False))))
    access = draw(st.sampled_from([0, PFERR_WRITE_MASK, PFERR_FETCH_MASK, PFERR_USER_MASK,
                                   PFERR_USER_MASK | PFERR_WRITE_MASK, PFERR_USER_MASK | PFERR_FETCH_MASK,
                                   PFERR_IMPLICIT_ACCESS, PFERR_IMPLICIT_ACCESS | PFERR_WRITE_MASK]))
    return Scenario(mode, ctx_kw, root, addr, access, draw(st.booleans()),
                    draw(st.integers(0, (1 << 32) - 1)), writes)


def trace(s: Scenario, mem: SparseMemory, leaf_level: int) -> dict[int, tuple[int, int]]:
    """{level: (entry address, entry)} from the root down to `leaf_level`, by plain indexing."""
    out = {}
    table = s.root & 0xFFFF_FFE0 if s.mode == "pae" else table_of(s.mode, s.root)
    for level in range(ROOT_LEVEL[s.mode], leaf_level - 1, -1):
        addr = table + s.esize * index(s.mode, level, s.addr)
        entry = mem.read(addr, s.esize)
        out[level] = (addr, entry)
        table = table_of(s.mode, entry)
    return out


def run(s: Scenario) -> tuple[object, SparseMemory, SparseMemory]:
    ctx = PagingContext(s.mode, **s.ctx_kw)  # type: ignore[arg-type]
    mem, before = s.memory(), s.memory()
    try:
        w = walk(ctx, mem, s.root, s.addr, s.access, ac=s.ac, pkru=s.pkru)
    except InvalidArgument:
        assert s.mode in ("32bit", "pae") and s.addr >= 1 << 32, "InvalidArgument for a valid address"
        return None, mem, before
    assert not (s.mode in ("32bit", "pae") and s.addr >= 1 << 32), "a 33-bit+ address was translated"
    return w, mem, before


def changed_entries(mem: SparseMemory, before: SparseMemory, s: Scenario) -> dict[int, tuple[int, int]]:
    """{address: (old, new)} for every entry-sized slot that differs."""
    out = {}
    for pfn in set(mem.pages) | set(before.pages):
        if mem.read_bytes(pfn << 12, 4096) == before.read_bytes(pfn << 12, 4096):
            continue
        for off in range(0, 4096, s.esize):
            a = (pfn << 12) + off
            old, new = before.read(a, s.esize), mem.read(a, s.esize)
            if old != new:
                out[a] = (old, new)
    return out


@SETTINGS
@given(scenarios())
def test_walker_never_crashes(s: Scenario) -> None:
    """Any tables, any control bits: the walker translates or reports a fault the mode can raise."""
    w, _, _ = run(s)
    if w is None:
        return
    ept = s.mode.startswith("ept")
    allowed = {0, EPT_VIOLATION, EPT_MISCONFIG} if ept else {0, PF, GP}
    assert w.fault in allowed
    if w.fault == PF:
        code = w.error_code
        assert code & ~0x3F == 0, f"error code {code:#x} has bits above PK"
        assert not (code & 8 and not code & 1), "RSVD without P"
        assert bool(code & 2) == bool(s.access & PFERR_WRITE_MASK)
        assert bool(code & 4) == bool(s.access & PFERR_USER_MASK)
    if w.fault == GP:
        assert s.mode in ("4level", "5level")
    if w.fault == 0:
        assert w.gpa & 0xFFF == s.addr & 0xFFF


@SETTINGS
@given(scenarios(modes=("32bit", "pae", "4level", "5level")))
def test_successful_translation_respects_the_access_rules(s: Scenario) -> None:
    """A translation only succeeds if every entry is present and the rights of every level allow it:
    U/S=1 everywhere for a user access, R/W=1 everywhere for a user write or any write with CR0.WP=1,
    no XD with NXE=1 for a fetch; SMEP blocks supervisor fetches and SMAP (AC=0 or implicit) supervisor
    data accesses of user-mode addresses; the leaf's key must allow a data access to a user page."""
    w, mem, before = run(s)
    if w is None or w.fault:
        return
    kw = s.ctx_kw
    path = trace(s, before, w.level)
    rights = [e for lvl, (_, e) in path.items() if not (s.mode == "pae" and lvl == 3)]
    assert all(e & 1 for _, e in path.values()), "a not-present entry was used"
    user_page = all(e & 4 for e in rights)
    writable = all(e & 2 for e in rights)
    xd = kw["nxe"] and s.mode != "32bit" and any(e >> 63 & 1 for e in rights)
    implicit = bool(s.access & PFERR_IMPLICIT_ACCESS)
    user = bool(s.access & PFERR_USER_MASK) and not implicit
    write = bool(s.access & PFERR_WRITE_MASK)
    fetch = bool(s.access & PFERR_FETCH_MASK)
    if user:
        assert user_page, "user access to a supervisor-mode address"
    if write and (user or kw["wp"]):
        assert writable, "write through a read-only level"
    if fetch:
        assert not xd, "fetch from an XD page"
        if not user and kw["smep"]:
            assert not user_page, "SMEP: supervisor fetch from a user-mode address"
    elif not user and kw["smap"] and (implicit or not s.ac):
        assert not user_page, "SMAP: supervisor data access to a user-mode address"
    if kw["pke"] and s.mode in ("4level", "5level") and user_page and not fetch:
        key = path[w.level][1] >> 59 & 0xF
        assert not s.pkru >> (2 * key) & 1, "access-disabled key"
        if write and (user or kw["wp"]):
            assert not s.pkru >> (2 * key + 1) & 1, "write-disabled key"
    if w.level > 1:
        assert path[w.level][1] & 0x80, "a large page without PS"
    limit = 36 if s.mode == "32bit" else kw["maxphyaddr"]
    assert w.gpa < 1 << limit


@SETTINGS
@given(scenarios())
def test_accessed_dirty_updates_follow_the_policy(s: Scenario) -> None:
    """Under the "kvm" policy a faulting walk writes nothing and a successful one sets only A on the
    entries used (D on the leaf for a write); under "hardware" a faulting walk only sets A bits.
    EPT entries get A/D (bits 8/9) only with EPT A/D enabled; PAE PDPTEs never change."""
    w, mem, before = run(s)
    if w is None or w.fault == GP:
        return
    ept = s.mode.startswith("ept")
    a_bit, d_bit = (0x100, 0x200) if ept else (0x20, 0x40)
    uses_ad = not ept or s.ctx_kw["ept_ad"]
    changes = changed_entries(mem, before, s)
    if not uses_ad or (w.fault and s.ctx_kw["ad_policy"] == "kvm"):
        assert not changes
        return
    for old, new in changes.values():
        assert new & ~old & ~(a_bit | d_bit) == 0 and old & ~new == 0, "only A/D bits may be set"
    # Success: A on every entry used, D on the leaf for a write.  Fault ("hardware" only): A on
    # every entry above the level where the walk stopped.  A table may point to itself, so two
    # levels can share a slot: compare final values per slot.
    path = trace(s, before, w.level)
    final: dict[int, int] = {}
    for level, (addr, entry) in path.items():
        if (s.mode == "pae" and level == 3) or (w.fault and level <= w.level):
            continue
        value = final.get(addr, entry) | a_bit
        if not w.fault and level == w.level and s.access & PFERR_WRITE_MASK:
            value |= d_bit
        final[addr] = value
    expect = {a: v for a, v in final.items() if v != before.read(a, s.esize)}
    assert {a: new for a, (_, new) in changes.items()} == expect


@SETTINGS
@given(scenarios(modes=("ept4", "ept5")))
def test_ept_translation_needs_the_rights_at_every_level(s: Scenario) -> None:
    """An EPT translation succeeds only if the AND of every level's R/W/X covers the access (read:
    R, write: W, fetch: X); a violation reports the access in bits 2:0 and that AND in bits 5:3."""
    w, _, before = run(s)
    if w is None or w.fault == EPT_MISCONFIG:
        return
    if w.fault == 0:
        path = trace(s, before, w.level)
        rights = 7
        for _, e in path.values():
            rights &= e
        need = 2 if s.access & PFERR_WRITE_MASK else 4 if s.access & PFERR_FETCH_MASK else 1
        assert rights & need == need
        assert w.pte_access == rights
    else:
        acc = w.error_code & 7
        expected_acc = 2 if s.access & PFERR_WRITE_MASK else 4 if s.access & PFERR_FETCH_MASK else 1
        assert acc == expected_acc
        assert w.error_code & ~0x3F == 0
