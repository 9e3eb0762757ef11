"""Plots where the signal is: per-interval rates instead of flat cumulative lines, a log scale when the
values span orders of magnitude, the miss rate per policy over time, and one access's walk."""

from __future__ import annotations

import pytest

from kvmmu.cli import main
from kvmmu.errors import KvmmuError
from kvmmu.report.plot import _log_wanted, check_output, interval_rates, miss_rates

SERIES = [{"t_s": 0.01, "exits": 100, "mmio_accesses": 50, "mmio_slow_path": 5},
          {"t_s": 0.02, "exits": 100, "mmio_accesses": 50, "mmio_slow_path": 5},   # an idle interval
          {"t_s": 0.04, "exits": 160, "mmio_accesses": 150, "mmio_slow_path": 6}]


def test_rates_are_per_interval_events_per_second() -> None:
    ts, ys = interval_rates(SERIES, "exits")
    assert ts == [0.01, 0.02, 0.04]
    assert ys == pytest.approx([100 / 0.01, 0.0, 60 / 0.02])


def test_miss_rate_is_the_share_of_each_intervals_accesses() -> None:
    ts, ys = miss_rates(SERIES)
    assert ts == [0.01, 0.04]                      # an interval without MMIO accesses has no rate
    assert ys == pytest.approx([10.0, 1.0])


def test_log_scale_when_values_span_two_orders_of_magnitude() -> None:
    assert _log_wanted([1, 5, 150], None) and not _log_wanted([10, 500], None)
    assert _log_wanted([10, 500], True) and not _log_wanted([1, 1e6], False)
    assert not _log_wanted([0, 0], None)


@pytest.mark.parametrize(("path", "words"), [("nodir/x.png", "does not exist"), (".", "is a directory"),
                                             ("x.txt", ".png, .svg or .pdf")])
def test_a_bad_picture_path_is_refused_before_any_work(path: str, words: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KvmmuError) as e:
        check_output(path)
    assert words in str(e.value)


def test_explain_plot_draws_the_walk(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "walk.png"
    assert main(["explain", "--target", "status", "--mmu", "ept", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert f"picture written to {out}" in capsys.readouterr().out


def test_missrate_plot_runs_every_policy(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    sc = tmp_path / "t.toml"
    sc.write_text('name = "t"\nduration_s = 0.004\nsample_ms = 0.5\n[[vm]]\nname = "g"\nram_mib = 64\nvcpus = 1\n'
                  '[vm.workload]\nkind = "mmio-bench"\niterations = 300\n')
    out = tmp_path / "miss.svg"
    assert main(["plot", str(sc), "--kind", "missrate", "--mmus", "shadow", "--policies", "off,generation",
                 "-o", str(out), "-q"]) == 0
    svg = out.read_text()
    assert "shadow/off" in svg and "shadow/generation" in svg
