"""`kvmmu sweep`: the matrix expands as written, every cell is the scenario it claims to be, results
are stored per cell (a killed sweep resumes, a finished one costs nothing), and cells run on a real
Dask scheduler with two worker processes started here as separate processes on 127.0.0.1."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmmu.errors import ScenarioError
from kvmmu.scenario import Scenario
from kvmmu.sweep import Store, run_and_summarise, run_sweep, spec_from_dict
from kvmmu.sweep.summary import mean_ci, total

BASE = {
    "name": "sw", "duration_s": 0.003,
    "host": {"cores": 2},
    "vm": [{"name": "a", "ram_mib": 64, "vcpus": 1, "mmu": "shadow", "mmio_caching": "generation",
            "os": {"boot_console_bytes": 2}, "workload": {"kind": "mmio-bench", "iterations": 30}},
           {"name": "b", "ram_mib": 64, "vcpus": 1, "mmu": "shadow", "mmio_caching": "generation",
            "os": {"boot_console_bytes": 2}, "workload": {"kind": "mmio-bench", "iterations": 30}}],
}


def _spec(**kw):
    return spec_from_dict({"base": BASE, "seeds": [1, 2], "matrix": {"vm.*.mmu": ["shadow", "ept"]}, **kw})


def test_the_matrix_expands_into_every_combination_for_every_seed() -> None:
    spec = spec_from_dict({"base": BASE, "seeds": [3, 4, 5],
                           "matrix": {"vm.*.mmu": ["shadow", "ept"], "vm.1.mmio_caching": ["off", "zap"],
                                      "cost.vm_exit": [800]}})
    cells = spec.cells()
    assert len(cells) == 2 * 2 * 1 * 3 and len({c.key for c in cells}) == len(cells)
    c = next(c for c in cells if dict(c.point) == {"vm.*.mmu": "ept", "vm.1.mmio_caching": "off",
                                                   "cost.vm_exit": 800} and c.seed == 4)
    assert [v["mmu"] for v in c.scenario["vm"]] == ["ept", "ept"]
    assert [v["mmio_caching"] for v in c.scenario["vm"]] == ["generation", "off"]
    assert c.scenario["cost"] == {"vm_exit": 800} and c.scenario["seed"] == 4
    assert BASE["vm"][0]["mmu"] == "shadow"          # the base is not changed by the expansion


@pytest.mark.parametrize(("doc", "words"), [
    ({"base": BASE, "matrix": {"vm.9.mmu": ["ept"]}}, "not an index"),
    ({"base": BASE, "matrix": {"vm.*.mmu": ["bogus"]}}, "bogus"),
    ({"base": BASE, "matrix": {"vm.*.mmu": []}}, "non-empty list"),
    ({"base": BASE, "seeds": [1, 1]}, "distinct"),
    ({"base": BASE, "sedes": [1]}, "unknown key"),
    ({"scenario": "no/such.toml"}, "no such file"),
    ({"base": BASE, "scenario": "x.toml"}, "exactly one"),
])
def test_a_bad_sweep_is_refused_before_anything_runs(doc: dict, words: str) -> None:
    with pytest.raises(ScenarioError) as e:
        spec_from_dict(doc)
    assert words in str(e.value)


def test_mean_and_confidence_interval_follow_students_t() -> None:
    m, h = mean_ci([10.0, 14.0])
    assert m == 12.0 and math.isclose(h, 12.706 * math.sqrt(8) / math.sqrt(2))
    m, h = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and math.isclose(h, 3.182 * math.sqrt(5 / 3) / 2)
    assert mean_ci([7.0]) == (7.0, 0.0)


# -- a real scheduler and two workers, as separate processes ------------------------------------------
@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    d = tmp_path_factory.mktemp("dask")
    sfile = d / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", str(sfile)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        deadline = time.monotonic() + 60
        while not sfile.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(sfile.read_text())["address"]
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                           "--nthreads", "1", "--nworkers", "1", "--no-dashboard"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        from dask.distributed import Client
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_cells_run_on_the_workers_and_equal_the_scenario_run_directly(scheduler, tmp_path) -> None:
    spec = _spec()
    summary, ran, n = run_and_summarise(spec, tmp_path / "r", scheduler=scheduler, quiet=True,
                                        metrics=["exits", "pf_taken"])
    assert ran == n == 4
    store = Store(tmp_path / "r")
    cell = spec.cells()[1]
    direct = Scenario.from_dict(json.loads(json.dumps(cell.scenario))).run()
    assert total(store.load(cell), "exits") == direct.total("exits")
    assert [col["seeds"] for col in summary["columns"]] == [2, 2]
    assert {col["point"]["vm.*.mmu"] for col in summary["columns"]} == {"shadow", "ept"}


def test_a_finished_sweep_costs_nothing(scheduler, tmp_path) -> None:
    spec = _spec()
    store = Store(tmp_path / "r")
    assert run_sweep(spec.cells(), store, scheduler=scheduler) == 4
    stamp = {p: p.stat().st_mtime_ns for p in store.cells.glob("*.json")}
    assert run_sweep(spec.cells(), store, scheduler="tcp://127.0.0.1:1") == 0   # never even connects
    assert {p: p.stat().st_mtime_ns for p in store.cells.glob("*.json")} == stamp


def test_a_killed_sweep_resumes_with_only_the_missing_cells(scheduler, tmp_path) -> None:
    """kvmmu sweep is killed (SIGKILL) after its first cell is stored; the rerun runs exactly the rest."""
    spec_path = tmp_path / "s.toml"
    base = dict(BASE, duration_s=0.01)
    lines = ["name = \"killed\"", "seeds = [1, 2, 3]", "[matrix]", "\"vm.*.mmu\" = [\"shadow\", \"ept\"]",
             "[base]", f"name = \"{base['name']}\"", f"duration_s = {base['duration_s']}",
             "[base.host]", "cores = 2"]
    for v in base["vm"]:
        lines += ["[[base.vm]]"] + [f"{k} = {json.dumps(x)}" for k, x in v.items() if not isinstance(x, dict)]
        lines += ["[base.vm.os]", "boot_console_bytes = 2", "[base.vm.workload]", "kind = \"mmio-bench\"",
                  "iterations = 400"]
    spec_path.write_text("\n".join(lines) + "\n")
    results = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "kvmmu.cli", "sweep", str(spec_path), "--results", str(results),
                             "--scheduler", scheduler, "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any((results / "cells").glob("*.json")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = len(list((results / "cells").glob("*.json")))
    assert 1 <= stored < 6, f"the sweep should be killed mid-way ({stored} of 6 stored)"
    for f in (results / "cells").glob("*.json"):          # a cell file is whole (written, then renamed)
        assert "exits" in json.loads(f.read_text())["result"]["vms"][0]["kvm_vcpu_stats"]
    from kvmmu.sweep import load_spec
    summary, ran, n = run_and_summarise(load_spec(spec_path), results, scheduler=scheduler, quiet=True,
                                        metrics=["exits"])
    assert n == 6 and ran == n - stored
    assert sum(c["seeds"] for c in summary["columns"]) == 6


def test_cli_sweep_prints_the_merged_table(scheduler, tmp_path, capsys) -> None:
    from kvmmu.cli import main
    p = tmp_path / "s.toml"
    p.write_text('name = "cli"\nseeds = [1]\nmetrics = ["exits", "mmio_accesses"]\n[base]\nduration_s = 0.002\n'
                 '[[base.vm]]\nname = "g"\nram_mib = 64\nvcpus = 1\n[base.vm.workload]\nkind = "mmio-bench"\n'
                 'iterations = 20\n[matrix]\n"vm.*.mmio_caching" = ["off", "generation"]\n')
    assert main(["sweep", str(p), "--results", str(tmp_path / "r"), "--scheduler", scheduler, "-q"]) == 0
    out = capsys.readouterr().out
    assert "vm.*.mmio_caching" in out and "off" in out and "generation" in out and "exits" in out
    assert main(["sweep", str(p), "--results", str(tmp_path / "r"), "--workers", "0", "-q"]) == 2


def test_bad_store_path_is_one_line(tmp_path, capsys) -> None:
    from kvmmu.cli import main
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = tmp_path / "s.toml"
    p.write_text('[base]\nduration_s = 0.002\n[[base.vm]]\nname = "g"\nram_mib = 64\n'
                 '[base.vm.workload]\nkind = "mmio-bench"\n')
    assert main(["sweep", str(p), "--results", str(blocker / "sub"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--results" in err and Path(blocker).is_file()


def test_a_cell_is_stored_whole_and_a_killed_write_leaves_no_cell(tmp_path: Path) -> None:
    # What a kill mid-write leaves (the temporary file) must never look like a stored cell, and it
    # is gone when the store is opened again.
    from kvmmu.sweep.engine import Store
    from kvmmu.sweep.spec import Cell
    store = Store(tmp_path)
    cell = Cell(point=(("vm.mmu", "ept"),), seed=1, scenario={"x": 1})
    (store.cells / ".tmp-killed.part").write_text('{"point": [[')
    store.save(cell, {"answer": 42})
    assert [p.name for p in store.cells.glob("*.json")] == [f"{cell.key}.json"]
    assert store.has(cell) and store.load(cell) == {"answer": 42}
    Store(tmp_path)
    assert sorted(p.name for p in store.cells.iterdir()) == [f"{cell.key}.json"]
