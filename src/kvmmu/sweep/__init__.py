"""`kvmmu sweep`: a matrix of scenario parameters x seeds, run on Dask distributed, stored per cell
(resumable), merged into one table with confidence intervals.  See docs/sweeps.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import ScenarioError
from .engine import Store, run_sweep
from .spec import Cell, SweepSpec, load_spec, spec_from_dict
from .summary import default_metrics, render_summary, summarise, summary_json

__all__ = ["Cell", "Store", "SweepSpec", "add_cli", "load_spec", "run_and_summarise", "run_sweep", "spec_from_dict"]


def _progress_line(quiet: bool) -> Any:
    def on_cell(done: int, total: int, cell: Cell, elapsed: float) -> None:
        if quiet:
            return
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("inf")
        print(f"kvmmu sweep: {done}/{total} cells ({100 * done / total:.0f} %), {rate * 60:.1f} cells/min, "
              f"ETA {eta:.0f} s  [{cell.label}, seed {cell.seed}]", file=sys.stderr, flush=True)
    return on_cell


def run_and_summarise(spec: SweepSpec, results_dir: str | Path, scheduler: str | None = None, workers: int = 2,
                      quiet: bool = False, limit: int | None = None,
                      metrics: list[str] | None = None) -> tuple[dict[str, Any], int, int]:
    """Run what the store lacks; returns (summary, cells run now, cells in the sweep)."""
    cells = spec.cells()
    store = Store(results_dir)
    ran = run_sweep(cells, store, scheduler=scheduler, workers=workers, on_cell=_progress_line(quiet), limit=limit)
    results = {c.key: store.load(c) for c in cells if store.has(c)}
    chosen = metrics or spec.metrics or default_metrics()
    return summarise(cells, results, chosen), ran, len(cells)


def add_cli(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="a matrix of scenario parameters x seeds on Dask distributed, resumable")
    s.add_argument("spec", help="a sweep TOML file (docs/sweeps.md)")
    s.add_argument("--results", help="the result store (default: .kvmmu-sweeps/<sweep name>)")
    s.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler (default: a local cluster)")
    s.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    s.add_argument("--metrics", help="comma list of counters to summarise (default: the compare rows)")
    s.add_argument("--limit", type=int, help="run at most this many missing cells, then summarise")
    s.add_argument("--json", action="store_true", help="the summary as JSON")
    s.add_argument("-o", "--output", help="write the summary to this file instead of stdout")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    s.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ..cliargs import emit as _emit
    if args.workers < 1 or args.workers > 256:
        raise ScenarioError(f"--workers {args.workers}: between 1 and 256 local worker processes")
    if args.limit is not None and args.limit < 0:
        raise ScenarioError(f"--limit {args.limit}: a number of cells, at least 0")
    spec = load_spec(args.spec)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    results = args.results or str(Path(".kvmmu-sweeps") / _slug(spec.name))
    summary, ran, n = run_and_summarise(spec, results, args.scheduler, args.workers, args.quiet, args.limit, metrics)
    if not args.quiet:
        print(f"kvmmu sweep: {n} cells, {ran} run now, {n - sum(c['seeds'] for c in summary['columns'])} missing; "
              f"results in {results}", file=sys.stderr)
    _emit(args, summary_json(summary) + "\n" if args.json else render_summary(summary, f"sweep {spec.name!r}"))
    return 0


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name).strip("-") or "sweep"
