"""Running a sweep's cells on Dask distributed, with every result stored as soon as it arrives.

Dask rather than Ray: it installs from PyPI as pure-Python wheels on every platform kvmmu runs on,
its `LocalCluster` gives real worker processes on one machine and `dask scheduler` / `dask worker`
the same on a cluster, and `as_completed` hands results back one by one, which is what a resumable
store needs.  A cell is one plain function call on a scenario dict (no shared state), so any worker
can run any cell.

The store is a directory: `cells/<key>.json` per finished cell, written atomically (a temporary file
renamed into place), so a sweep killed at any point resumes with exactly the cells that were not
stored, and a finished sweep reruns for free.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import KvmmuError, ScenarioError
from .spec import Cell


def run_cell(scenario: dict[str, Any]) -> dict[str, Any]:
    """One cell, on a worker: build and run the scenario, return its result as plain data."""
    from ..scenario import Scenario
    t0 = time.process_time()
    res = Scenario.from_dict(scenario, f"sweep cell {scenario.get('name', '')}").run()
    out = res.to_dict()
    out["cpu_s"] = round(time.process_time() - t0, 3)
    return out


class Store:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.cells = self.root / "cells"
        try:
            self.cells.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ScenarioError(f"--results {str(root)!r}: cannot create it ({e.strerror})") from None
        # A sweep killed while writing a cell leaves its temporary file: never a cell, removed here.
        for stale in self.cells.glob(".tmp-*.part"):
            stale.unlink(missing_ok=True)

    def path(self, cell: Cell) -> Path:
        return self.cells / f"{cell.key}.json"

    def has(self, cell: Cell) -> bool:
        return self.path(cell).is_file()

    def load(self, cell: Cell) -> dict[str, Any]:
        return json.loads(self.path(cell).read_text(encoding="utf-8"))["result"]

    def save(self, cell: Cell, result: dict[str, Any]) -> None:
        doc = {"point": [[p, v] for p, v in cell.point], "seed": cell.seed, "scenario": cell.scenario,
               "result": result}
        fd, tmp = tempfile.mkstemp(dir=self.cells, prefix=".tmp-", suffix=".part")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        os.replace(tmp, self.path(cell))


def run_sweep(cells: list[Cell], store: Store, scheduler: str | None = None, workers: int = 2,
              on_cell: Callable[[int, int, Cell, float], None] | None = None,
              limit: int | None = None) -> int:
    """Run every cell the store lacks (at most `limit` of them); returns how many ran.  With no
    scheduler address a LocalCluster of `workers` processes is started and stopped here."""
    todo = list({c.key: c for c in cells if not store.has(c)}.values())
    if limit is not None:
        todo = todo[:limit]
    if not todo:
        return 0
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as e:          # pragma: no cover - a dependency of kvmmu
        raise KvmmuError(f"kvmmu sweep needs dask.distributed: {e}") from None
    cluster = None
    try:
        if scheduler is None:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, host="127.0.0.1", silence_logs=logging.ERROR)
            client = Client(cluster)
        else:
            client = Client(scheduler, timeout="20s")
    except OSError as e:
        raise ScenarioError(f"--scheduler {scheduler!r}: cannot connect ({e})") from None
    t0 = time.monotonic()
    done = 0
    try:
        futures = {client.submit(run_cell, c.scenario, key=f"kvmmu-cell-{c.key}", pure=False): c for c in todo}
        for fut in as_completed(futures):
            cell = futures[fut]
            try:
                result = fut.result()
            except KvmmuError:
                raise
            except Exception as e:      # a worker died or the cell crashed: keep what is stored
                raise KvmmuError(f"sweep cell [{cell.label}, seed {cell.seed}] failed: {e}") from None
            store.save(cell, result)
            done += 1
            if on_cell is not None:
                on_cell(done, len(todo), cell, time.monotonic() - t0)
    finally:
        client.close()
        if cluster is not None:
            # The workers' shutdown chatter is Dask's, not the sweep's: keep stderr to one line per cell.
            logging.getLogger("distributed").setLevel(logging.CRITICAL)
            cluster.close()
    return done
