"""The fast paths answer only where they answer what the general path would (benchmarks/equivalence.py
at a `make test` size): probe()/probe_ept() against walk() on random tables, and run_accesses() against
a loop of access() on shadow, EPT and NPT VMs.  tests/arch/test_permission.py checks the same paths
against the access rule exhaustively; this one checks them on random tables and access streams.
"""

from __future__ import annotations

import random

import pytest
from benchmarks.equivalence import _check_batches, _check_probe


@pytest.mark.parametrize("seed", [7, 11])
def test_probes_agree_with_walk(seed: int) -> None:
    assert _check_probe(random.Random(seed), 150) > 2000      # most random walks are answered


@pytest.mark.parametrize("seed", [7, 12])
def test_run_accesses_agrees_with_access(seed: int) -> None:
    assert _check_batches(random.Random(seed), 3, ops_per_step=200) > 1000
