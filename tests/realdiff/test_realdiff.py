"""The differential runner and its corpus: the same guest bytes on the model and on /dev/kvm.

The corpus test is the issue's acceptance check: every program agrees with the real kvm_pvm host,
or the difference is documented in the program (``expect``) as an understood model gap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvmmu.errors import ScenarioError
from kvmmu.guest.runtime import Program
from kvmmu.real import available, unavailable_reason
from kvmmu.real.hostinfo import kvm_pvm_mismatch
from kvmmu.realdiff import (
    COUNTERS,
    Mmio,
    Observation,
    add_cli,
    compare,
    diff_program,
    format_report,
    load_programs,
    run_model,
)

CORPUS = Path(__file__).parent / "corpus"
PROGRAMS = load_programs([CORPUS])
needs_kvm = pytest.mark.skipif(not available(), reason=f"needs a usable /dev/kvm: {unavailable_reason()}")
kvm_pvm_only = pytest.mark.skipif(kvm_pvm_mismatch() is not None, reason=str(kvm_pvm_mismatch()))


def test_corpus_has_at_least_30_programs_each_at_cpl0_and_cpl3() -> None:
    names = {p.name for p in PROGRAMS}
    assert len(PROGRAMS) >= 30
    bases = {n.rsplit("_cpl", 1)[0] for n in names}
    assert all(f"{b}_cpl0" in names and f"{b}_cpl3" in names for b in bases)


@pytest.mark.parametrize(("profile", "rings"), [
    pytest.param("kvm-pvm", "_cpl", marks=pytest.mark.skipif(available(), reason="the real diff runs them")),
    ("vmx-ept", "_cpl3"), ("vmx-shadow", "_cpl0")])
def test_model_runs_the_corpus_under_every_profile(profile: str, rings: str) -> None:
    """Every corpus program runs on the model to its end — its last hlt, or the internal error of
    an instruction fetch from MMIO (handle_emulation_failure: at CPL0 upstream, at every CPL on
    kvm-pvm; at CPL3 upstream injects #UD).  The VMX profiles take one ring each, to keep the suite
    fast."""
    for program in (p for p in PROGRAMS if rings in p.name):
        obs = run_model(program, profile)
        assert obs.error is None, (program.name, obs.error)
        if obs.stops == ["internal_error"]:
            assert program.name.startswith(("fetch_from_mmio", "ud0", "bp_gate")), program.name
            assert profile == "kvm-pvm" or program.cpl == 0, program.name
            continue
        if obs.stops == ["shutdown"]:       # deliveries.py: escalations to a triple fault
            assert any(k in program.name for k in ("triple_fault", "frame_on_mmio", "stack_")), program.name
            continue
        assert obs.stops[-1] == "hlt" and len(obs.stops) == program.runs, program.name


@pytest.mark.realkvm
@needs_kvm
@kvm_pvm_only
@pytest.mark.parametrize("program", PROGRAMS, ids=[p.name for p in PROGRAMS])
def test_model_agrees_with_real_kvm(program: Program) -> None:
    """Stops, MMIO stream, final memory, fault log, counters and registers are equal, or the
    difference is one the program documents.  A real run that a host interrupt lengthened (one more
    `exits`) is run again, up to 20 times, before its minimum is compared (a loaded CI machine takes
    more interrupts than the default 5 runs absorb)."""
    report = diff_program(program, repeats=20)
    undocumented = [d for d in report.diffs if not d.equal and not d.documented]
    assert not undocumented, format_report([report])
    documented = [d for d in report.diffs if not d.equal and d.documented]
    assert {d.name for d in documented} <= set(program.expect)


def test_compare_names_the_first_mmio_difference_and_counter_deltas() -> None:
    prog = Program("p", "hlt")
    a = Observation("model", stops=["hlt"], counters=dict.fromkeys(COUNTERS, 0),
                    mmio=[Mmio(0x1000, 4, True, b"\1\0\0\0"), Mmio(0x1004, 4, False, b"\2\0\0\0")])
    b = Observation("real", stops=["hlt"], counters={**dict.fromkeys(COUNTERS, 0), "pf_taken": 2},
                    mmio=[Mmio(0x1000, 4, True, b"\1\0\0\0"), Mmio(0x1004, 2, False, b"\2\0")])
    diffs = {d.name: d for d in compare(prog, a, b)}
    assert diffs["stops"].equal and diffs["memory"].equal
    assert not diffs["mmio"].equal and "first difference at #1" in "\n".join(diffs["mmio"].lines)
    assert not diffs["counters"].equal and any("pf_taken" in line for line in diffs["counters"].lines)


def test_memory_diff_shows_page_table_flags() -> None:
    """A differing qword in the page-table pool is shown with its PTE flags (A/D visible)."""
    prog = Program("p", "hlt")
    page = bytearray(4096)
    a = Observation("model", memory={0x10000: bytes(page)})
    page[0:8] = (0x11027).to_bytes(8, "little")
    b = Observation("real", memory={0x10000: bytes(page)})
    [mem] = [d for d in compare(prog, a, b) if d.name == "memory"]
    assert "PTE model 0 / real P|RW|US|A" in mem.lines[0]


def test_load_programs_rejects_bad_corpus_files(tmp_path: Path) -> None:
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(ScenarioError, match="neither PROGRAMS nor PROGRAM"):
        load_programs([tmp_path])
    with pytest.raises(ScenarioError, match="does not exist"):
        load_programs([tmp_path / "missing"])


def test_cli_subcommand_runs_the_model_only(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="kvmmu")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["real-diff", str(CORPUS / "mmio_rmw.py"), "--model-only", "-k", "cpl0"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "mmio_rmw_cpl0" in out and "model-only" in out and "mmio_rmw_cpl3" not in out
