"""The mypyc build of the hot modules (kvmmu._native, kvmmu.tools.native): when the compiled code
runs, and that it computes what the Python source computes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvmmu import _native
from kvmmu._native import NATIVE_MODULES, PURE_ENV, decide

TAG = sys.implementation.cache_tag
DIGESTS = {m: f"sha-{i}" for i, m in enumerate(NATIVE_MODULES)}
ALL = set(NATIVE_MODULES)


def manifest(**changes: str) -> dict:
    return {"python": TAG, "modules": {**DIGESTS, **changes}}


def test_a_build_that_matches_every_source_runs_compiled() -> None:
    assert decide(manifest(), DIGESTS, {}, ALL)[0]


def test_the_pure_switch_wins_over_a_good_build() -> None:
    compiled, why = decide(manifest(), DIGESTS, {PURE_ENV: "1"}, ALL)
    assert not compiled and PURE_ENV in why
    assert decide(manifest(), DIGESTS, {PURE_ENV: "0"}, ALL)[0]     # "0" asks for nothing


def test_one_edited_source_sends_the_whole_group_to_source() -> None:
    # The compiled modules call each other natively, so one stale module cannot be replaced alone.
    edited = NATIVE_MODULES[-1]
    compiled, why = decide(manifest(), {**DIGESTS, edited: "sha-edited"}, {}, ALL)
    assert not compiled and edited in why


@pytest.mark.parametrize("case", ["no manifest", "other interpreter", "module missing", "extension missing",
                                  "module list changed"])
def test_an_incomplete_build_runs_the_source(case: str) -> None:
    m: dict | None = manifest()
    ext = set(ALL)
    if case == "no manifest":
        m = None
    elif case == "other interpreter":
        m = {**manifest(), "python": "cpython-27"}
    elif case == "module list changed":
        assert m is not None
        m["modules"]["kvmmu.hw.gone"] = "sha-gone"
    elif case == "module missing":
        assert m is not None
        del m["modules"][NATIVE_MODULES[0]]
    else:
        ext.discard(NATIVE_MODULES[0])
    assert not decide(m, DIGESTS, {}, ext)[0]


def _run(code: str, pure: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    if pure:
        env[PURE_ENV] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, timeout=600).stdout


def test_the_pure_switch_loads_every_module_from_its_source() -> None:
    out = _run("import kvmmu, sys; from kvmmu import _native\n"
               "import " + ", ".join(NATIVE_MODULES) + "\n"
               "print(_native.status()[0]); print(*(sys.modules[m].__file__ for m in _native.NATIVE_MODULES))",
               pure=True)
    compiled, files = out.splitlines()
    assert compiled == "False"
    assert all(f.endswith(".py") for f in files.split())


needs_build = pytest.mark.skipif(not _native.status()[0], reason=f"native build not in use: {_native.status()[1]}")


@needs_build
def test_the_built_tree_loads_the_compiled_modules() -> None:
    import importlib
    for m in NATIVE_MODULES:
        assert not importlib.import_module(m).__file__.endswith(".py"), m


# Runs that go through every compiled module: shadow paging and EPT guests with their faults, MMIO,
# A/D updates, the host's memory and KVM's counters, and the demo's table.  The compiled and the
# source run must print the same.
_SCENARIOS = """
import json
from kvmmu.report.demo import run_demo
from kvmmu.report.experiments import seed_a_scenario
for flavour, policy in (("shadow", "generation"), ("ept", "generation"), ("shadow", "off")):
    print(json.dumps(seed_a_scenario(0.02, 5, flavour, policy).run().to_dict(), sort_keys=True, default=str))
print(run_demo(seed=3, duration_s=0.02))
"""


@needs_build
def test_compiled_and_source_compute_the_same() -> None:
    compiled = _run(_SCENARIOS, pure=False)
    source = _run(_SCENARIOS, pure=True)
    assert compiled.strip() and compiled == source


@needs_build
def test_a_build_leaves_no_extension_outside_the_group() -> None:
    # An extension of a module that left the list would be compiled against another shared library.
    from kvmmu.tools.native import built_extensions
    assert sorted(built_extensions()) == sorted(_native.extension_path(m) for m in NATIVE_MODULES)
