"""The walker against the independent access oracle, case by case, in the spirit of kvm-unit-tests
``access``: fault or not, the exact #PF error code, the exact PTE and PDE (and upper entries) after the
access, and the translation, for every paging mode and both A/D policies.

The default run is a deterministic slice: every combination of the CPU controls with every access
kind (`control_space`), every reserved-address bit at MAXPHYADDR 36/46/52 (`reserved_space`), and a
seeded sample of the whole space.  The exhaustive spaces run under ``-m full``.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from kvmmu.arch import PagingContext, walk
from kvmmu.arch.bits import PF_VECTOR
from kvmmu.hw.memory import SparseMemory
from tests.oracle import access_cases as spaces
from tests.oracle.access_rules import (
    CR0_WP,
    CR4_PKE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_NX,
    EFLAGS_AC,
    FLAG,
    FLAG_NAMES,
    MODES,
    TWICE,
    Case,
    entry_addresses,
    entry_size,
    expected,
    is_legal,
    layout,
    make_case,
    pfec,
    pkru,
)

POLICIES = ("kvm", "hardware")
SEED = 20260611
SAMPLE_PER_MODE = 2500

_contexts: dict[tuple[object, ...], PagingContext] = {}


def context_for(case: Case) -> PagingContext:
    key = (case.mode, case.maxphyaddr, case.ad_policy,
           case.flags & (EFER_NX | CR0_WP | CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_PSE))
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = _contexts[key] = PagingContext(
            case.mode, maxphyaddr=case.maxphyaddr, nxe=case.has(EFER_NX), wp=case.has(CR0_WP),
            smep=case.has(CR4_SMEP), smap=case.has(CR4_SMAP), pke=case.has(CR4_PKE),
            pse=case.has(CR4_PSE), gbpages=True, ad_policy=case.ad_policy)
    return ctx


def run_walker(case: Case) -> tuple[int, int, dict[int, int], int, int]:
    """(vector, error code, entries after, gpa, level) from the walker on fresh memory."""
    mem = SparseMemory()
    lay = layout(case, mem.write)
    ctx = context_for(case)
    ac = case.has(EFLAGS_AC)
    key_reg = pkru(case)
    if case.has(TWICE):
        walk(ctx, mem, lay.root, lay.la, 0, ac=ac, pkru=key_reg)
    w = walk(ctx, mem, lay.root, lay.la, pfec(case), ac=ac, pkru=key_reg)
    esz = entry_size(case.mode)
    after = {lvl: mem.read(addr, esz) for lvl, addr in entry_addresses(case.mode).items()}
    return w.fault, w.error_code, after, w.gpa, w.level


def compare(case: Case) -> str | None:
    """None when the walker agrees with the oracle, else a one-line description of the difference."""
    exp = expected(case)
    vector, code, after, gpa, level = run_walker(case)
    diffs = []
    if exp.fault:
        if vector != PF_VECTOR:
            diffs.append(f"expected #PF {exp.error_code:#x}, walker gave vector {vector}")
        elif code != exp.error_code:
            diffs.append(f"error code {code:#x}, expected {exp.error_code:#x}")
    elif vector:
        diffs.append(f"expected success, walker gave vector {vector} code {code:#x}")
    else:
        if gpa != exp.gpa:
            diffs.append(f"gpa {gpa:#x}, expected {exp.gpa:#x}")
        if level != exp.level:
            diffs.append(f"leaf level {level}, expected {exp.level}")
    for lvl in sorted(exp.entries, reverse=True):
        if after[lvl] != exp.entries[lvl]:
            diffs.append(f"level-{lvl} entry {after[lvl]:#x}, expected {exp.entries[lvl]:#x}")
    return f"{case}: " + "; ".join(diffs) if diffs else None


def check(cases: Iterable[Case], limit: int = 20) -> int:
    """Compare every case; fail with the first `limit` differences.  Returns the number of cases."""
    bad: list[str] = []
    n = nbad = 0
    for case in cases:
        n += 1
        msg = compare(case)
        if msg:
            nbad += 1
            if len(bad) < limit:
                bad.append(msg)
    assert not bad, f"{nbad} of {n} cases disagree with the oracle:\n" + "\n".join(bad)
    assert n, "the case set is empty"
    return n


def access_id(access: int) -> str:
    return "+".join(n for n in FLAG_NAMES if FLAG[n] & access) or "read"


MODE_POLICY = [pytest.param(m, p, id=f"{m}-{p}") for m in MODES for p in POLICIES]


# --------------------------------------------------------------------------------------------
# The oracle itself, on cases whose answer the rules document spells out.
@pytest.mark.parametrize(("mode", "names", "fault", "code"), [
    # 2.4: the PK rule is checked on top of R/W: a user write to a read-only user page with WD set.
    ("4level", "pte.p pte.user pde.p pde.rw pde.user pkey cr4.pke pkru.wd user write", True, 0x27),
    # 2.8: XD with NXE=0 is a reserved bit; no I/D without NXE or SMEP.
    ("4level", "pte.p pte.nx pde.p pde.rw fetch", True, 0x09),
    # 4.4: SMEP reports I/D even with NXE=0.
    ("4level", "pte.p pte.user pde.p pde.user pde.rw cr4.smep fetch", True, 0x11),
    # 2.2: a not-present PDE clears P in the error code.
    ("4level", "pte.p user write", True, 0x06),
    # 2.4: CR0.WP=0 lets a supervisor write a read-only page.
    ("4level", "pte.p pde.p write", False, 0),
    # 5.5: SMAP: a supervisor read of a user page with AC=0 faults; with AC=1 it does not.
    ("pae", "pte.p pte.user pde.p pde.user cr4.smap", True, 0x01),
    ("pae", "pte.p pte.user pde.p pde.user cr4.smap eflags.ac", False, 0),
    # 5.5: ... but an implicit access faults whatever AC says.
    ("pae", "pte.p pte.user pde.p pde.user cr4.smap eflags.ac implicit", True, 0x01),
    # 32-bit paging reports I/D only with SMEP, not for NXE alone (not-present PTE, user fetch).
    ("32bit", "pde.p pde.user efer.nx user fetch", True, 0x04),
    ("32bit", "pde.p pde.user efer.nx cr4.smep user fetch", True, 0x14),
])
def test_oracle_matches_the_documented_examples(mode: str, names: str, fault: bool, code: int) -> None:
    """The oracle gives the outcomes the rules document states for these examples."""
    case = make_case(mode, names.split())
    assert is_legal(case)
    exp = expected(case)
    assert (exp.fault, exp.error_code) == (fault, code)


def test_oracle_leaves_a_faulting_4k_pte_untouched_and_hardware_sets_upper_a() -> None:
    """2.6: a fault never changes the PTE; under "hardware" the passed non-leaf entries get A."""
    names = ["pte.p", "pde.p", "pde.rw", "pde.user", "user", "write"]
    kvm = expected(make_case("4level", names, ad_policy="kvm"))
    hw = expected(make_case("4level", names, ad_policy="hardware"))
    assert kvm.fault and hw.fault
    assert kvm.pte == hw.pte and not kvm.pte & 0x60
    assert not kvm.pde & 0x20 and hw.pde & 0x20
    assert hw.entries[4] & 0x20 and hw.entries[3] & 0x20 and not kvm.entries[3] & 0x20


# --------------------------------------------------------------------------------------------
# The default slice.
@pytest.mark.parametrize(("mode", "policy"), MODE_POLICY)
def test_every_cpu_control_combination(mode: str, policy: str) -> None:
    """Every CR0.WP/EFER.NXE/CR4.SMEP/SMAP/PKE/PSE/EFLAGS.AC/PKRU combination, every access kind,
    on a present 4 KiB page of every U/W/X (and key) shape, agrees with the oracle."""
    check(spaces.control_space(mode, policy))


@pytest.mark.parametrize(("mode", "policy"), MODE_POLICY)
def test_reserved_address_bits_by_maxphyaddr(mode: str, policy: str) -> None:
    """Bits MAXPHYADDR..51 (PAE: ..62) are reserved in present entries, for MAXPHYADDR 36, 46, 52."""
    for m in (36, 46, 52):
        check(spaces.reserved_space(mode, m, policy))


@pytest.mark.parametrize(("mode", "policy"), MODE_POLICY)
def test_seeded_sample_of_all_flags(mode: str, policy: str) -> None:
    """A seeded sample of the whole legal flag space (every flag free, MAXPHYADDR 36/46/52)."""
    check(spaces.random_cases(mode, SAMPLE_PER_MODE, SEED, policy))


# --------------------------------------------------------------------------------------------
# The full enumeration.
@pytest.mark.full
@pytest.mark.parametrize("access", spaces.ACCESS_KINDS, ids=access_id)
@pytest.mark.parametrize(("mode", "policy"), MODE_POLICY)
def test_full_rights_space(mode: str, policy: str, access: int) -> None:
    """Every legal combination of entry rights, P, PS, reserved bit, keys and CPU controls."""
    check(spaces.rights_space(mode, policy, access))


@pytest.mark.full
@pytest.mark.parametrize(("mode", "policy"), MODE_POLICY)
def test_full_ad_space(mode: str, policy: str) -> None:
    """Every legal combination of A/D presets, `twice`, access kind, P, PS, R/W, U/S, WP, SMEP."""
    check(spaces.ad_space(mode, policy))


@pytest.mark.full
@pytest.mark.parametrize(("mode", "policy"), MODE_POLICY)
def test_full_random_sample(mode: str, policy: str) -> None:
    """A larger seeded sample of the whole flag space (interactions the products keep apart)."""
    check(spaces.random_cases(mode, 100_000, SEED + 1, policy))
