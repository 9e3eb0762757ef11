"""The `kvmmu` command line with bad arguments: exit status 2, exactly one line on stderr, naming the
bad value, nothing on stdout (run as a subprocess, `python -m kvmmu.cli ...`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

GOOD_SCENARIO = """\
name = "bad-input"
seed = 1
duration_s = 0.01
[host]
cores = 1
[[vm]]
name = "guest"
ram_mib = 64
vcpus = 1
mmu = "shadow"
mmio_caching = "generation"
[vm.workload]
kind = "kernel-compile"
jobs = 1
heap_pages = 4
text_pages = 4
header_pages = 2
compute_ms = 1.0
"""


def _kvmmu(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmmu.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def _assert_one_line_exit_2(p: subprocess.CompletedProcess, *mentions: str) -> None:
    lines = p.stderr.splitlines()
    assert p.returncode == 2, f"exit status {p.returncode}; stderr: {p.stderr!r}"
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not exactly one line: {p.stderr!r}"
    assert lines[0].startswith("kvmmu:"), lines[0]
    assert "Traceback" not in p.stderr
    assert p.stdout == "", f"stdout: {p.stdout!r}"
    for m in mentions:
        assert m in lines[0], f"the message does not name {m!r}: {lines[0]}"


@pytest.mark.parametrize("args,mentions", [
    ((), ("command",)),
    (("frobnicate",), ("frobnicate",)),
    (("demo", "--seed", "abc"), ("abc",)),
    (("demo", "--no-such-option"), ("--no-such-option",)),
    (("explain", "--mmu", "vmx"), ("vmx",)),
    (("explain", "--policy", "sometimes"), ("sometimes",)),
    (("experiment", "z"), ("z",)),
    (("run",), ("scenario",)),
    (("run", "/nonexistent/scenario.toml"), ("/nonexistent/scenario.toml",)),
])
def test_bad_argument_exits_2_with_one_line(args: tuple[str, ...], mentions: tuple[str, ...]) -> None:
    _assert_one_line_exit_2(_kvmmu(*args), *mentions)


def test_the_good_scenario_runs(tmp_path: Path) -> None:
    """(The bad scenarios below are this one with one thing broken.)"""
    path = tmp_path / "good.toml"
    path.write_text(GOOD_SCENARIO)
    p = _kvmmu("run", str(path), "--quiet")
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("text,mentions", [
    ('name = "x\n', ()),                                                    # TOML syntax
    (GOOD_SCENARIO.replace('mmu = "shadow"', 'mmu = "vmx"'), ("vmx",)),      # a value outside its set
    (GOOD_SCENARIO.replace("vcpus = 1", "vcpus = 0"), ("vcpus",)),           # a range
    (GOOD_SCENARIO.replace("ram_mib = 64", 'ram_mib = "lots"'), ("ram_mib",)),   # a type
    (GOOD_SCENARIO.replace("ram_mib = 64", "ram_mib = 1048576000"), ("ram_mib",)),  # beyond the host
    (GOOD_SCENARIO.replace("seed = 1", "seed = 1\nfrobnicate = 1"), ("frobnicate",)),   # an unknown key
])
def test_bad_scenario_file_exits_2_with_one_line(tmp_path: Path, text: str, mentions: tuple[str, ...]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    _assert_one_line_exit_2(_kvmmu("run", str(path)), *mentions)
