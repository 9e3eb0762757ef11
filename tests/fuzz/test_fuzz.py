"""The stateful fuzzer, for every MMU flavour (EPT/NPT on the TDP MMU and on the legacy MMU) x MMIO policy
(the guest paging mode and the rest are drawn).

Fast profile (default, part of `make test`): derandomized, so every run executes the same examples.
Long profile (`make fuzz`, KVMMU_FUZZ_PROFILE=long): random, seeded by pytest's --hypothesis-seed,
a flavour x policy that would start after KVMMU_FUZZ_DEADLINE (a time.monotonic() value) is skipped
-- see tests/fuzz/long.py.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.fuzz import world as W
from tests.fuzz.machine import FLAVOURS, POLICIES, machine_for, profile

# The fast profile does not shrink (a failure is reported at once, un-minimised; the minimised
# reproducers of every bug found so far are in test_found_bugs.py).  The long profile shrinks.
FAST = settings(max_examples=10, stateful_step_count=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True, phases=[Phase.explicit, Phase.generate])
LONG = settings(max_examples=int(os.environ.get("KVMMU_FUZZ_EXAMPLES", "40")),
                stateful_step_count=int(os.environ.get("KVMMU_FUZZ_STEPS", "80")), deadline=None,
                derandomize=False, database=None, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_guest_cannot_tell_escape_or_crash(flavour: str, policy: str) -> None:
    """Under any interleaving of guest and VMM operations, every access result is one the architecture
    allows, guest memory is exactly what the architecture says, vm.audit() stays clean and no TLB
    entry reaches memory outside its own VM."""
    long = profile() == "long"
    deadline = float(os.environ["KVMMU_FUZZ_DEADLINE"]) if long and "KVMMU_FUZZ_DEADLINE" in os.environ else None
    if deadline is not None and time.monotonic() > deadline:
        pytest.skip("fuzz time budget used up")
    before = (W.COUNTERS.steps, W.COUNTERS.ops, W.COUNTERS.accesses)
    try:
        run_state_machine_as_test(machine_for(flavour, policy), settings=LONG if long else FAST)
    finally:
        out = os.environ.get("KVMMU_FUZZ_STATS")
        if out:
            with open(out, "a") as f:
                f.write(json.dumps({"combo": f"{flavour}/{policy}", "steps": W.COUNTERS.steps - before[0],
                                    "ops": W.COUNTERS.ops - before[1],
                                    "accesses": W.COUNTERS.accesses - before[2]}) + "\n")
