"""Every bad input the reliability and CLI issues listed, one by one: one line on stderr naming the value,
exit status 2, nothing on stdout, nothing written, and (for arguments) nothing run.

Most cases call `kvmmu.cli.main` in-process (fast); the ones about the process itself (a closed pipe,
a corpus that calls sys.exit) run `python -m kvmmu.cli` as a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmmu.cli import main

from .test_cli import GOOD_SCENARIO, _assert_one_line_exit_2, _kvmmu

CHURN = GOOD_SCENARIO.replace('kind = "kernel-compile"\njobs = 1\nheap_pages = 4\ntext_pages = 4\nheader_pages = 2\n'
                              'compute_ms = 1.0\n', 'kind = "memslot-churn"\n')
NETPERF = GOOD_SCENARIO.replace('kind = "kernel-compile"\njobs = 1\nheap_pages = 4\ntext_pages = 4\n'
                                'header_pages = 2\ncompute_ms = 1.0\n', 'kind = "netperf-rr"\n')
assert CHURN != GOOD_SCENARIO and NETPERF != GOOD_SCENARIO


def _one_line(capsys, argv: list[str], *mentions: str) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, f"exit status {code}; stderr: {err!r}"
    assert len(lines) == 1 and lines[0].startswith("kvmmu: error: "), f"not one error line: {err!r}"
    assert out == "", out
    for m in mentions:
        assert m in lines[0], f"the message does not name {m!r}: {lines[0]}"
    return lines[0]


@pytest.fixture
def good(tmp_path: Path) -> Path:
    p = tmp_path / "good.toml"
    p.write_text(GOOD_SCENARIO)
    return p


def _scenario(tmp_path: Path, text: str | bytes) -> str:
    p = tmp_path / "s.toml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


# -- files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,mentions", [
    (b"name = \"\xff\xfe\"\n" + GOOD_SCENARIO.encode(), ("UTF-8",)),
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", ("nested too deeply",)),
    (GOOD_SCENARIO.replace("seed = 1", "seed = 1\nsample_ms = inf"), ("sample_ms", "inf")),
    (GOOD_SCENARIO.replace("seed = 1", "seed = 1\nsample_ms = nan"), ("sample_ms", "nan")),
    (GOOD_SCENARIO.replace("seed = 1", "seed = 1\nsample_ms = 1e-300"), ("sample_ms", "1e-300")),
    (GOOD_SCENARIO.replace("duration_s = 0.01", "duration_s = nan"), ("duration_s", "nan")),
    (GOOD_SCENARIO.replace("compute_ms = 1.0", "compute_ms = nan"), ("compute_ms", "nan")),
    (GOOD_SCENARIO.replace("compute_ms = 1.0", "compute_ms = inf"), ("compute_ms", "inf")),
    (NETPERF + "rtt_us = nan\n", ("rtt_us", "nan")),
    (CHURN + "actions = 5\n", ("actions", "5")),
    (CHURN + "period_us = nan\n", ("period_us", "nan")),
    (CHURN + "period_us = inf\n", ("period_us", "inf")),
    (CHURN + "period_us = 1e-12\n", ("period_us", "1e-12")),
    (CHURN + "display_hz = 1e12\n", ("display_hz",)),
    (CHURN + "display_hz = 1000000000000\n", ("display_hz", "1000000000000")),
    (GOOD_SCENARIO.replace("ram_mib = 64", "ram_mib = -512"), ("ram_mib=-512",)),
    (GOOD_SCENARIO + "[os]\nghz = nan\n", ("ghz", "nan")),
    (GOOD_SCENARIO.replace("seed = 1", "seed = -1"), ("seed", "-1")),
])
def test_bad_scenario_file(capsys, tmp_path: Path, text: str | bytes, mentions: tuple[str, ...]) -> None:
    t0 = time.monotonic()
    _one_line(capsys, ["run", _scenario(tmp_path, text), "-q"], *mentions)
    assert time.monotonic() - t0 < 30          # refused while loading: no hang, no simulation


def test_a_scenario_that_is_a_directory(capsys, tmp_path: Path) -> None:
    _one_line(capsys, ["run", str(tmp_path)], str(tmp_path), "directory")


@pytest.mark.parametrize("name,data,mentions", [
    ("c.toml", b"vm_exit = \"\xff\"\n", ("UTF-8",)),
    ("c.toml", ("x = " + "[" * 5000 + "]" * 5000).encode(), ("nested too deeply",)),
    ("c.json", ("[" * 5000 + "]" * 5000).encode(), ("nested too deeply",)),
    ("c.json", b'{"vm_exit": ' + b"9" * 5000 + b"}", ("not valid JSON",)),
    ("c.json", b'{"vm_exit": NaN}', ("vm_exit", "nan")),
    ("c.toml", b"vm_exit = 100000000000000", ("vm_exit", "100000000000000")),
])
def test_bad_cost_file(capsys, good: Path, tmp_path: Path, name: str, data: bytes, mentions: tuple[str, ...]) -> None:
    cost = tmp_path / name
    cost.write_bytes(data)
    _one_line(capsys, ["run", str(good), "--cost", str(cost)], *mentions)


def test_corpus_with_programs_not_a_list(capsys, tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("PROGRAMS = 5\n")
    _one_line(capsys, ["real-diff", str(tmp_path), "--model-only"], "PROGRAMS = 5")


def test_corpus_that_exits_at_import_is_refused_not_obeyed(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("import sys\nsys.exit(0)\n")
    _assert_one_line_exit_2(_kvmmu("real-diff", str(tmp_path), "--model-only"), "sys.exit(0)")


# -- arguments: checked before anything runs ------------------------------------------------------
@pytest.mark.parametrize("argv,mentions", [
    (["explain", "--gva", "zzz"], ("--gva", "'zzz'")),
    (["explain", "--gva", "-1"], ("--gva", "'-1'")),
    (["explain", "--gva", str(1 << 64)], ("--gva",)),
    (["explain", "--warm", "-1"], ("--warm", "'-1'")),
    (["explain", "-o", "/nonexistent-dir/x.txt"], ("/nonexistent-dir",)),
    (["experiment", "b", "--duration", "5"], ("--duration", "experiment b")),
    (["experiment", "a", "--duration", "nan"], ("--duration", "'nan'")),
    (["experiment", "a", "--duration", "0"], ("--duration", "'0'")),
    (["real-diff", "tests/realdiff/corpus", "--repeats", "0"], ("--repeats", "'0'")),
    (["real-diff", "tests/realdiff/corpus", "--repeats", "-1"], ("--repeats", "'-1'")),
    (["flavours", "--iterations", "0"], ("--iterations", "'0'")),
    (["flavours", "--mmu", "shadow,vmx"], ("--mmu", "'vmx'")),
    (["linux-boot", "--limit", "0"], ("--limit", "'0'")),
    (["linux-boot", "--policies", "off,cache"], ("--policies", "'cache'")),
    (["demo", "--seed", "-5"], ("--seed", "'-5'")),
])
def test_bad_argument(capsys, argv: list[str], mentions: tuple[str, ...]) -> None:
    _one_line(capsys, argv, *mentions)


@pytest.mark.parametrize("argv,mentions", [
    (["--duration", "inf"], ("--duration", "'inf'")),
    (["--mmu", "shadow,ept"], ("--mmu", "give one")),
    (["--policy", "zap", "--policies", "sometimes"], ("--policies", "'sometimes'")),
])
def test_bad_run_argument(capsys, good: Path, argv: list[str], mentions: tuple[str, ...]) -> None:
    _one_line(capsys, ["run", str(good), *argv], *mentions)


def test_trace_refuses_an_unknown_event_name(capsys, good: Path) -> None:
    _one_line(capsys, ["trace", str(good), "--events", "kvm_page_fault,bogus"], "bogus")


@pytest.mark.parametrize("output,mentions", [
    ("nodir/x.png", ("nodir",)),
    ("x.txt", ("x.txt", ".png")),
    ("", ("file name",)),
])
def test_plot_output_is_checked_before_the_run(capsys, good: Path, tmp_path: Path, monkeypatch, output: str,
                                               mentions: tuple[str, ...]) -> None:
    monkeypatch.chdir(tmp_path)
    _one_line(capsys, ["plot", str(good), "-o", output], *mentions)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.toml"]


def test_plot_to_an_existing_directory_is_refused(capsys, good: Path, tmp_path: Path) -> None:
    target = tmp_path / "charts"
    target.mkdir()
    _one_line(capsys, ["plot", str(good), "-o", str(target)], str(target), "directory")
    assert sorted(tmp_path.iterdir()) == sorted([good, target]) and list(target.iterdir()) == []


@pytest.mark.parametrize("kind", ["series", "compare"])
def test_plot_metrics_are_checked_before_the_run(capsys, good: Path, tmp_path: Path, kind: str) -> None:
    _one_line(capsys, ["plot", str(good), "-o", str(tmp_path / "x.png"), "--kind", kind, "--metrics",
                       "exits,bogus"], "'bogus'")


def test_a_series_plot_takes_one_mmu(capsys, good: Path, tmp_path: Path) -> None:
    _one_line(capsys, ["plot", str(good), "-o", str(tmp_path / "x.png"), "--mmu", "shadow,ept"], "--mmu", "one run")


# -- the same option names everywhere -------------------------------------------------------------
def test_old_spellings_are_hidden_aliases(capsys, good: Path) -> None:
    assert main(["compare", str(good), "--mmus", "shadow", "--policies", "generation", "--csv", "-q"]) == 0
    assert "shadow/generation" in capsys.readouterr().out
    assert main(["compare", str(good), "--mmu", "shadow", "--policy", "generation", "--csv", "-q"]) == 0
    assert "shadow/generation" in capsys.readouterr().out
    assert main(["linux-boot", "--flavours", "ept", "--policies", "generation", "--limit", "50", "-q"]) == 0
    assert "ept/generation" in capsys.readouterr().out
    for command in ("compare", "linux-boot", "plot"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "--mmu" in text and "--policy" in text
        assert "--mmus" not in text and "--policies" not in text and "--flavours" not in text


# -- the process --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["trace", "real-diff"])
def test_a_closed_pipe_ends_quietly(good: Path, command: str) -> None:
    """`kvmmu ... | head`: the reader goes away; no BrokenPipeError traceback."""
    corpus = Path(__file__).parents[1] / "realdiff" / "corpus" / "mmio_widths.py"
    argv = ["trace", str(good)] if command == "trace" else \
        ["real-diff", str(corpus), "--model-only", "--json"]
    p = subprocess.Popen([sys.executable, "-m", "kvmmu.cli", *argv, "-q"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()                  # before the child (still importing) writes its first byte
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert err == ""
    assert p.returncode in (0, 141)
