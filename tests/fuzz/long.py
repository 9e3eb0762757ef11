"""The long fuzz profile: `make fuzz` (FUZZ_SECONDS=600 make fuzz), or

    python -m tests.fuzz.long [--seconds N] [--seed S] [--examples E] [--steps K]

Runs rounds of tests/fuzz/test_fuzz.py (every MMU flavour x MMIO policy) and
tests/fuzz/test_nested_fuzz.py (nested EPT under random L1 EPT tables) with random examples until
the time is up.  Each round is one pytest process seeded with --hypothesis-seed, so any round can
be replayed exactly with the command line it prints.  Prints, per round and in total, the seed, the
steps and operations executed and the result; stops at the first failure (hypothesis's minimised
steps are printed) and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _round(seed: int, deadline: float, examples: int, steps: int, extra: list[str]) -> tuple[int, dict, str]:
    """One pytest run; returns (returncode, {steps, ops, accesses}, output)."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as stats:
        path = stats.name
    env = dict(os.environ, KVMMU_FUZZ_PROFILE="long", KVMMU_FUZZ_DEADLINE=repr(deadline), KVMMU_FUZZ_STATS=path,
               KVMMU_FUZZ_EXAMPLES=str(examples), KVMMU_FUZZ_STEPS=str(steps))
    cmd = [sys.executable, "-m", "pytest", "tests/fuzz/test_fuzz.py", "tests/fuzz/test_nested_fuzz.py",
           "-p", "no:xdist", "-p", "no:cacheprovider", "-q", "-x", f"--hypothesis-seed={seed}", *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    done = {"steps": 0, "ops": 0, "accesses": 0}
    try:
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            for k in done:
                done[k] += rec[k]
    finally:
        os.unlink(path)
    return p.returncode, done, p.stdout + p.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.long", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", "600")))
    ap.add_argument("--seed", type=int, default=None, help="seed of the first round (default: random)")
    ap.add_argument("--examples", type=int, default=int(os.environ.get("FUZZ_EXAMPLES", "8")),
                    help="hypothesis examples per flavour x policy per round")
    ap.add_argument("--steps", type=int, default=int(os.environ.get("FUZZ_STEPS", "80")),
                    help="steps per example (hypothesis stateful_step_count)")
    ap.add_argument("--pytest-arg", action="append", default=[], metavar="ARG",
                    help="an extra argument for each round's pytest (repeatable), e.g. -k shadow")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    total = {"steps": 0, "ops": 0, "accesses": 0}
    rounds = 0
    print(f"kvmmu long fuzz: {args.seconds:.0f} s, first seed {seed}, {args.examples} examples x "
          f"{args.steps} steps per flavour x policy per round", flush=True)
    result = "PASS"
    while time.monotonic() < deadline:
        rounds += 1
        rc, done, out = _round(seed, deadline, args.examples, args.steps, args.pytest_arg)
        for k in total:
            total[k] += done[k]
        verdict = "ok" if rc == 0 else "FAIL"
        print(f"round {rounds}: seed {seed}: {done['steps']} steps, {done['ops']} operations "
              f"({done['accesses']} guest accesses): {verdict}", flush=True)
        if rc != 0:
            print(out[-20000:])
            print(f"reproduce: KVMMU_FUZZ_PROFILE=long KVMMU_FUZZ_EXAMPLES={args.examples} "
                  f"KVMMU_FUZZ_STEPS={args.steps} python -m pytest tests/fuzz/test_fuzz.py -p no:xdist "
                  f"--hypothesis-seed={seed}")
            result = "FAIL"
            break
        seed = (seed + 1) % (1 << 32)
    elapsed = time.monotonic() - t0
    print(f"result: {result}: {rounds} rounds, {total['steps']} steps, {total['ops']} operations "
          f"({total['accesses']} guest accesses) in {elapsed:.0f} s", flush=True)
    return 0 if result == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
