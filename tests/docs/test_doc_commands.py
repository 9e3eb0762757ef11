"""Every command the README and docs/*.md show runs (tests/docs/doccommands.py says what counts as
a command): it must exit 0 and print no traceback.

How each command is run is written down here, nothing is skipped silently:

- PLACEHOLDERS: the words a document uses for "your file" are replaced, token by token, by a real
  one (an example scenario, a file in a temporary directory, the packaged Linux-boot recording);
- SYNOPSIS: a usage line of docs/cli.md (`[--option ...]`) is run as the concrete invocations
  listed for it, which between them use every option the line shows;
- QUICK: a command that runs for minutes as shown is run with a shorter `--duration` / `--limit`
  here, and exactly as shown under the suite's `full` marker (`make test-full`);
- NOT_RUN: what needs the nested lab, network, root, /dev/kvm, or would run the suite itself, with
  the reason; the test also fails when this list names a command the documents no longer show;
- EXIT_STATUS: `real-diff` exits 1 by design when a program differs from the real KVM
  (docs/cli.md, "Exit status"); the number is asserted, and still no traceback.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .doccommands import ROOT, all_commands

BIN = Path(sys.executable).parent
SCENARIO = "scenarios/tiny.toml"

PLACEHOLDERS = {
    "SCENARIO.toml": SCENARIO,                        # the smallest example scenario
    "FILE.png": "{tmp}/out.png",
    "FILE.pftrace": "{tmp}/out.pftrace",
    "FILE": "{tmp}/out.txt",
    "F": "{tmp}/cost.toml",                           # `--cost F`: written by the test, one override
    "PATH...": "tests/realdiff/corpus/pte_edits.py",
    "my_programs/": "tests/realdiff/corpus/",         # "your own programs": the shipped corpus
    "path/to/recording": "src/kvmmu/data/linux-boot-mmio-pc-smp2",   # the packaged recording
    "figures.json": "{tmp}/figures.json",
    ".kvmmu-sweeps/p": "{tmp}/sweeps",
}

SYNOPSIS = {
    "kvmmu run SCENARIO.toml": [
        "kvmmu run SCENARIO.toml --json --mmu ept --policy zap --tdp-mmu N --duration 0.01 --seed 3 --cost F "
        "-o FILE -q",
        "kvmmu run SCENARIO.toml --csv --duration 0.01"],
    "kvmmu compare SCENARIO.toml": [
        "kvmmu compare SCENARIO.toml --mmu shadow,ept --policy off,zap,generation --tdp-mmu Y --json",
        "kvmmu compare SCENARIO.toml --mmu shadow --policy zap --csv"],
    "kvmmu flavours": [
        "kvmmu flavours --mmu shadow,ept,npt,nested-ept --policy generation --tdp-mmu N --iterations 20"],
    "kvmmu explain": [
        "kvmmu explain --mmu ept --policy zap --target lapic --kind read --warm 2 --memslot-change "
        "--plot FILE.png",
        "kvmmu explain --mmu shadow --policy generation --gva 0xffff888000000000 --swapped-tables"],
    "kvmmu trace SCENARIO.toml": [
        "kvmmu trace SCENARIO.toml -e kvm_exit -e kvmmmu:*mmio* --head 20 --export FILE.pftrace",
        "kvmmu trace SCENARIO.toml --list"],
    "kvmmu stat SCENARIO.toml": [
        "kvmmu stat SCENARIO.toml -1 -f exit -g guest --interval 0.01",
        "kvmmu stat SCENARIO.toml -l --interval 0.01"],
    "kvmmu kvm-stat-report SCENARIO.toml": ["kvmmu kvm-stat-report SCENARIO.toml --vm guest"],
    "kvmmu plot SCENARIO.toml": [
        "kvmmu plot SCENARIO.toml -o FILE.png --kind series --metrics pf_taken,exits --cumulative --log",
        "kvmmu plot SCENARIO.toml -o FILE.png --kind compare --mmu shadow,ept --policy zap,generation --linear",
        "kvmmu plot SCENARIO.toml -o FILE.png --kind missrate --mmu shadow --policy zap,generation"],
    "kvmmu experiment a|b|c": [
        "kvmmu experiment a --duration 0.002", "kvmmu experiment b", "kvmmu experiment c --duration 0.002"],
    "kvmmu linux-boot": [
        "kvmmu linux-boot --trace path/to/recording --limit 1000 --mmu shadow,ept --policy off,generation "
        "--profile qemu"],
    "kvmmu real-diff PATH...": [
        "kvmmu real-diff PATH... -k cpl3 --model-only --repeats 2 --json -v",
        "kvmmu real-diff PATH... -k cpl0 --recorded tests/realdiff/lab/shadow.json -o FILE -q"],
    "kvmmu sweep SPEC.toml": [
        "kvmmu sweep docs/examples/policies.toml --results {tmp}/s --workers 1 --metrics exits,mmio_slow_path "
        "--limit 2 --json -o FILE -q"],
    # setup and real-diff need the lab (NOT_RUN below names them); status runs anywhere.
    "kvmmu lab setup|status|real-diff": ["kvmmu lab status"],
}

# The command as shown -> what runs in the default suite (the command as shown runs under `full`).
QUICK = {
    "kvmmu demo": "kvmmu experiment a --duration 0.002",     # the demo is experiment (a) at 0.25 s
    "kvmmu experiment a --duration 1": "kvmmu experiment a --duration 0.002",
    "kvmmu compare scenarios/seed-a.toml": "kvmmu compare scenarios/seed-a.toml --duration 0.002",
    "kvmmu compare scenarios/churn.toml --mmu shadow,ept --policy zap,generation":
        "kvmmu compare scenarios/churn.toml --mmu shadow,ept --policy zap,generation --duration 0.005",
    "kvmmu experiment c": "kvmmu experiment c --duration 0.002",
    "kvmmu linux-boot": "kvmmu linux-boot --limit 1000",
    "kvmmu linux-boot --limit 20000 --mmu shadow,ept,npt --policy off,generation":
        "kvmmu linux-boot --limit 1000 --mmu shadow,ept,npt --policy off,generation",
    "kvmmu linux-boot --profile qemu": "kvmmu linux-boot --profile qemu --limit 1000",
    "kvmmu linux-boot --trace path/to/recording": "kvmmu linux-boot --trace path/to/recording --limit 1000",
    "kvmmu real-diff my_programs/ --model-only --profile vmx-ept":
        "kvmmu real-diff my_programs/ --model-only --profile vmx-ept -k mmio_loop",
    "python -m benchmarks --only tlb mmio": "python -m benchmarks --only tlb --json figures.json",
    "python -m benchmarks.equivalence": "python -m benchmarks.equivalence --cases 300",
    "kvmmu sweep docs/examples/policies.toml": "kvmmu sweep docs/examples/policies.toml --results {tmp}/s1 --limit 2",
    "kvmmu sweep docs/examples/policies.toml --workers 4 --results .kvmmu-sweeps/p --json":
        "kvmmu sweep docs/examples/policies.toml --workers 2 --results .kvmmu-sweeps/p --json --limit 2",
    "python -m benchmarks --json figures.json": "python -m benchmarks --only tlb --json figures.json",
    "python -m benchmarks.kcompile --profile": None,      # seconds as shown
    "kvmmu real-diff tests/realdiff/corpus tests/realdiff/lab/scenarios --recorded tests/realdiff/lab/shadow.json":
        "kvmmu real-diff tests/realdiff/corpus tests/realdiff/lab/scenarios --recorded tests/realdiff/lab/shadow.json "
        "-k slot_ -k gen_slot",
}

NOT_RUN = {
    "make test": "runs the whole suite, this test included",
    "make demo": "builds a virtualenv and runs `kvmmu demo`, which runs here (under `full` as shown)",
    "make bench": "minutes of benchmarks; `python -m benchmarks --only tlb mmio` runs here",
    "make lab": "boots the nested lab (QEMU, apt packages, a Debian kernel: network, minutes)",
    "kvmmu experiment a --full": "the modelled hour: hours of host time",
    "kvmmu lab setup": "apt-get and a kernel download (network, root)",
    "kvmmu lab real-diff tests/realdiff/corpus --config shadow": "needs the nested lab (kvmmu lab setup)",
    "kvmmu lab real-diff tests/realdiff/lab/scenarios -k mmio64 --config npt --no-mmio-caching":
        "needs the nested lab (kvmmu lab setup)",
    "kvmmu lab real-diff CORPUS --config npt-legacy --save out.json": "needs the nested lab (kvmmu lab setup)",
    "kvmmu real-diff tests/realdiff/corpus": "needs /dev/kvm; `--model-only` of the same corpus runs here",
    "kvmmu real-diff tests/realdiff/corpus/pte_edits.py -k cpl3 -v": "needs /dev/kvm; the synopsis runs it "
                                                                     "with --model-only",
}
# Run when /dev/kvm is there (they exit 1 when a program differs from the host's KVM).
NEEDS_KVM = {"kvmmu real-diff tests/realdiff/corpus", "kvmmu real-diff tests/realdiff/corpus/pte_edits.py -k cpl3 -v"}

EXIT_STATUS = {
    # Programs of the 100 differ from the recorded svm-shadow run (docs/real-kvm.md lists them).
    "kvmmu real-diff tests/realdiff/corpus tests/realdiff/lab/scenarios --recorded tests/realdiff/lab/shadow.json": 1,
}



def _synopsis_key(text: str) -> str | None:
    if "[" not in text and "|" not in text and "..." not in text:
        return None
    head = text.split(" [")[0].split(" -o ")[0]
    return head if head in SYNOPSIS else text


def _plan() -> list[tuple[str, str, bool]]:
    """(what the docs show, what runs, full-only) for every command, in document order."""
    out: list[tuple[str, str, bool]] = []
    seen: set[str] = set()
    for c in all_commands():
        if c.text in seen:
            continue
        seen.add(c.text)
        if c.text in NOT_RUN:
            continue
        key = _synopsis_key(c.text)
        if key is not None:
            assert key in SYNOPSIS, f"{c}: a usage line without concrete invocations in SYNOPSIS"
            out += [(str(c), inv, False) for inv in SYNOPSIS[key]]
        elif c.text in QUICK:
            quick = QUICK[c.text]
            out.append((str(c), quick or c.text, False))
            if quick is not None:
                out.append((str(c), c.text, True))
        else:
            out.append((str(c), c.text, False))
    runs: set[tuple[str, bool]] = set()
    unique = []
    for shown, cmd, full in out:       # a command two documents show runs once
        if (cmd, full) not in runs:
            runs.add((cmd, full))
            unique.append((shown, cmd, full))
    return unique


PLAN = _plan()


def test_every_exception_names_a_command_the_docs_still_show() -> None:
    shown = {c.text for c in all_commands()}
    for table in (NOT_RUN, QUICK, NEEDS_KVM):
        stale = set(table) - shown
        assert not stale, f"listed here but no longer in README/docs: {sorted(stale)}"
    assert set(EXIT_STATUS) <= {cmd for _, cmd, _ in PLAN}, "EXIT_STATUS names a command that no longer runs"
    keys = {_synopsis_key(t) for t in shown} - {None}
    assert set(SYNOPSIS) <= keys, f"SYNOPSIS entries for usage lines docs/cli.md no longer has: {set(SYNOPSIS) - keys}"


def test_the_docs_show_commands() -> None:
    """The extraction finds the README's quick start and docs/cli.md's synopsis (else this test
    would pass by running nothing)."""
    shown = [c.text for c in all_commands()]
    assert "make demo" in shown and "kvmmu run scenarios/tiny.toml" in shown
    assert sum(t.startswith("kvmmu run SCENARIO.toml [") for t in shown) == 1
    assert len(PLAN) >= 40


def _argv(cmd: str, tmp: Path) -> list[str]:
    words = []
    for w in shlex.split(cmd):
        w = PLACEHOLDERS.get(w, w).replace("{tmp}", str(tmp))
        words.append(w)
    if words[0] == "kvmmu":
        return [str(BIN / "kvmmu"), *words[1:]]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    raise AssertionError(f"no way to run {cmd!r}")


def _run(shown: str, cmd: str, tmp_path: Path) -> None:
    (tmp_path / "cost.toml").write_text("vm_exit = 1300\n")
    env = dict(os.environ, COLUMNS="120", PYTHONWARNINGS="ignore::DeprecationWarning")
    p = subprocess.run(_argv(cmd, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=900, env=env,
                       stdin=subprocess.DEVNULL)
    want = EXIT_STATUS.get(cmd, 0)
    if cmd == "kvmmu lab status" and "not ready:" in p.stdout:
        want = 1                                   # docs/cli.md: exits 1 while the lab is not ready
    tail = (p.stdout[-1500:] + "\n--- stderr ---\n" + p.stderr[-3000:])
    assert "Traceback (most recent call last)" not in p.stdout + p.stderr, f"{shown}\n  ran: {cmd}\n{tail}"
    assert p.returncode == want, f"{shown}\n  ran: {cmd}\n  exit {p.returncode}, want {want}\n{tail}"
    assert p.stdout.strip() or "-o " in cmd or "--output" in cmd, f"{shown}: printed nothing"


@pytest.mark.parametrize(("shown", "cmd"), [(s, c) for s, c, full in PLAN if not full], ids=lambda v: v[:60])
def test_doc_command_runs(shown: str, cmd: str, tmp_path: Path) -> None:
    _run(shown, cmd, tmp_path)


@pytest.mark.full
@pytest.mark.parametrize(("shown", "cmd"), [(s, c) for s, c, full in PLAN if full], ids=lambda v: v[:60])
def test_doc_command_runs_as_shown(shown: str, cmd: str, tmp_path: Path) -> None:
    _run(shown, cmd, tmp_path)


@pytest.mark.realkvm
@pytest.mark.full
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
@pytest.mark.parametrize("cmd", sorted(NEEDS_KVM))
def test_doc_command_on_dev_kvm(cmd: str, tmp_path: Path) -> None:
    """On the real /dev/kvm real-diff exits 0 when every program agrees and 1 when one differs."""
    p = subprocess.run(_argv(cmd, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=900,
                       stdin=subprocess.DEVNULL)
    assert "Traceback (most recent call last)" not in p.stdout + p.stderr, p.stderr[-3000:]
    assert p.returncode in (0, 1), p.stderr[-3000:]
