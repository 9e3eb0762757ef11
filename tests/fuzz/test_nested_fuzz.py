"""Nested EPT with random L1 EPT tables against the SDM reference of tests/fuzz/nested.py.

Fast profile (default, part of `make test`): derandomized.  Long profile (`make fuzz`,
KVMMU_FUZZ_PROFILE=long): random, seeded by --hypothesis-seed, skipped after KVMMU_FUZZ_DEADLINE.
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import world as W
from tests.fuzz.machine import profile
from tests.fuzz.nested import NestedWorld

LONG = profile() == "long"
STEPS = int(os.environ.get("KVMMU_FUZZ_STEPS", "80")) if LONG else 60
SETTINGS = settings(max_examples=int(os.environ.get("KVMMU_FUZZ_EXAMPLES", "40")) if LONG else 12,
                    deadline=None, derandomize=not LONG, database=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(seed=st.integers(0, 2 ** 32 - 1), maxphyaddr=st.sampled_from((36, 46, 46, 52)))
def test_l2_under_random_l1_ept_tables_matches_the_sdm(seed: int, maxphyaddr: int) -> None:
    """Every L2 access ends in the SDM's outcome (EPT violation with its qualification, EPT
    misconfiguration, RAM, or a KVM_EXIT_MMIO at the right L1 gpa), L1 memory equals the reference and
    vm.audit() holds after every step."""
    deadline = float(os.environ["KVMMU_FUZZ_DEADLINE"]) if LONG and "KVMMU_FUZZ_DEADLINE" in os.environ else None
    if deadline is not None and time.monotonic() > deadline:
        pytest.skip("fuzz time budget used up")
    w = NestedWorld(seed, maxphyaddr)
    rng = random.Random(seed ^ 0xE97)
    done = 0
    try:
        for i in range(STEPS):
            msg = w.step(rng)
            done += 1
            w.vm.audit()
            assert msg is None, f"step {i} (seed {seed}, MAXPHYADDR {maxphyaddr}): {msg}"
    finally:
        W.COUNTERS.steps += done
        W.COUNTERS.ops += 2 * done
        W.COUNTERS.accesses += done
        out = os.environ.get("KVMMU_FUZZ_STATS")
        if out:
            with open(out, "a") as f:
                f.write(json.dumps({"combo": "nested-ept", "steps": done, "ops": 2 * done, "accesses": done}) + "\n")
