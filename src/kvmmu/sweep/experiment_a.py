"""Experiment (a) --full on the sweep engine: the report's experiment, run as sweep cells."""

from __future__ import annotations

from typing import Any

from ..report.experiments import _a_row, _a_text, _seed_a_dict
from . import _progress_line
from .engine import Store, run_sweep
from .spec import spec_from_dict
from .summary import total


def experiment_a_on_engine(duration_s: float, seed: int = 1, results: str | None = None,
                           scheduler: str | None = None, workers: int = 2, quiet: bool = False) -> str:
    """Experiment (a) as six sweep cells (one per flavour / policy pair: the three guests share one
    host, so a pair is the smallest independent unit) on Dask distributed, each stored when done:
    a killed run resumes with the pairs still missing."""
    spec = spec_from_dict({"base": _seed_a_dict(duration_s, seed, "shadow", "off"), "seeds": [seed],
                           "matrix": {"vm.*.mmu": ["shadow", "ept"],
                                      "vm.*.mmio_caching": ["off", "zap", "generation"]}}, "experiment-a")
    cells = spec.cells()
    store = Store(results or f".kvmmu-sweeps/experiment-a-{duration_s:g}s-seed{seed}")
    run_sweep(cells, store, scheduler=scheduler, workers=workers, on_cell=_progress_line(quiet))
    rows, modelled, cpu = [], 0.0, 0.0
    for c in cells:
        r = store.load(c)
        point = dict(c.point)

        def cell_total(name: str, r: dict[str, Any] = r) -> int:
            return int(total(r, name))
        rows.append(_a_row(point["vm.*.mmu"], point["vm.*.mmio_caching"], cell_total, r["host"]["swapins"]))
        modelled, cpu = r["modelled_s"], cpu + r.get("cpu_s", 0.0)
    return _a_text(modelled, seed, rows, f" Six cells on Dask, {cpu:,.0f} CPU seconds in all.")


__all__ = ["experiment_a_on_engine"]
