"""A seed names one run: what the tests draw does not depend on the process they run in.

Each check runs the same thing in two fresh processes that differ in what a pytest worker can
differ in (the kvmmu modules earlier tests imported, PYTHONHASHSEED) and wants the same result.
Before tests/conftest.py pinned hypothesis's local constants, both checks failed: a worker that had
imported every kvmmu module drew other examples than a fresh one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imports every kvmmu module first when argv[1] == "all" (as a worker that ran every other test
# has), then runs argv[2:] (python code or a pytest command line).
_PRELUDE = """
import importlib, pkgutil, sys
if sys.argv[1] == "all":
    import kvmmu
    for m in pkgutil.walk_packages(kvmmu.__path__, "kvmmu."):
        try:
            importlib.import_module(m.name)
        except Exception:
            pass
"""

_DRAWS = _PRELUDE + """
import tests.conftest      # what pytest loads before any test under tests/
from hypothesis import given, settings, strategies as st
seen = []
@settings(derandomize=True, database=None, max_examples=300)
@given(st.integers(0, 2 ** 64 - 1), st.integers(0, 0xFFF), st.text(max_size=4))
def draw(a, b, s):
    seen.append((a, b, s))
draw()
print(repr(seen))
"""

_PYTEST = _PRELUDE + """
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


def _run(code: str, modules: str, hashseed: str, *args: str, env: dict[str, str] | None = None) -> str:
    p = subprocess.run([sys.executable, "-c", code, modules, *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": hashseed, **(env or {})}, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout


def test_derandomized_draws_do_not_depend_on_imported_modules() -> None:
    fresh = _run(_DRAWS, "few", "1")
    assert len(eval(fresh)) == 300
    assert _run(_DRAWS, "all", "2") == fresh


def test_no_hypothesis_test_has_a_wall_clock_deadline() -> None:
    from hypothesis import settings
    assert settings().deadline is None


def test_fuzz_state_machine_examples_do_not_depend_on_the_worker(tmp_path: Path) -> None:
    """The fast profile of test_fuzz.py, one flavour x policy: the same steps, operations and
    accesses in a fresh process and in one that imported every kvmmu module, hash seeds apart."""
    got = []
    for i, (modules, hashseed) in enumerate((("few", "1"), ("all", "2"))):
        stats = tmp_path / f"stats{i}.jsonl"
        _run(_PYTEST, modules, hashseed, "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
             "tests/fuzz/test_fuzz.py::test_guest_cannot_tell_escape_or_crash[shadow-generation]",
             env={"KVMMU_FUZZ_STATS": str(stats), "KVMMU_FUZZ_PROFILE": "fast"})
        got.append([json.loads(line) for line in stats.read_text().splitlines()])
    assert len(got[0]) == 1 and got[0][0]["accesses"] > 0
    assert got[1] == got[0]
