"""report.linux_boot: the experiment's data and its text (a short prefix of the boot keeps it quick)."""

from __future__ import annotations

import pytest

from kvmmu import ScenarioError
from kvmmu.report.linux_boot import format_linux_boot, main, reading, run_linux_boot

LIMIT = 1500


@pytest.fixture(scope="module")
def report():
    return run_linux_boot(("shadow", "ept"), ("off", "zap", "generation"), limit=LIMIT)


def test_one_run_per_flavour_and_policy(report) -> None:
    assert [(r.flavour, r.policy) for r in report.runs] == [
        (f, p) for f in ("shadow", "ept") for p in ("off", "zap", "generation")]
    assert all(r.mmio_accesses == LIMIT for r in report.runs)


def test_phase_rows_add_up_to_the_total(report) -> None:
    """Per-phase counters are deltas of the same counters: they sum to the run's total."""
    for run in report.runs:
        total = run.result.total
        for name in ("pf_taken", "pf_emulate", "exits"):
            assert sum(p.stats.get(name, 0) for p in run.result.phases) == total.stats.get(name, 0)
        assert sum(run.cycles_by_phase.values()) == run.cycles
        assert sum(p.mmio_accesses for p in run.result.phases) == total.mmio_accesses


def test_fast_path_share_follows_the_policy(report) -> None:
    """Caching off: no access avoids the full path; with MMIO sptes nearly all do."""
    assert report.run("shadow", "off").fast_share == 0.0
    gen = report.run("shadow", "generation")
    assert gen.fast_share == 1 - gen.result.total.mmio_full_path / LIMIT > 0.9


def test_text_has_the_tables_and_the_reading(report) -> None:
    text = format_linux_boot(report)
    for part in ("Workload: A real MMIO trace: Linux 6.1 booting on a 2-vCPU PC", "2 vCPUs",
                 "firmware", "Totals", "Per phase, ept/generation:", "What the model makes",
                 "MMIO sptes created", "fast path hits (spte)", "cycles per MMIO access",
                 f"Replayed: the first {LIMIT:,}"):
        assert part in text
    said = " ".join(reading(report))
    assert "identical counters" in said and "exited to the VMM" in said
    assert "Every read returned the recorded value" in said


def test_bad_arguments_are_scenario_errors() -> None:
    with pytest.raises(ScenarioError, match="flavour='npu'"):
        run_linux_boot(("npu",), ("off",), limit=1)
    with pytest.raises(ScenarioError, match="policy='cache'"):
        run_linux_boot(("shadow",), ("cache",), limit=1)
    with pytest.raises(ScenarioError, match="limit=-1"):
        run_linux_boot(("shadow",), ("off",), limit=-1)


def test_main_prints_one_line_and_exits_2_on_a_user_error(capsys) -> None:
    assert main(["--policy", "nope", "--limit", "10"]) == 2
    assert capsys.readouterr().err.startswith("kvmmu: error: argument --policy: 'nope': unknown MMIO policy")
    assert main(["--mmu", "ept", "--policy", "generation", "--limit", "200", "-q"]) == 0
    assert "ept/generation" in capsys.readouterr().out
