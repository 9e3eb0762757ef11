"""Experiment (a) per flavour/policy pair: CPU seconds per modelled second, and peak RSS (issue 18).

Each pair runs `seed_a_scenario(duration, seed, flavour, policy).run()` - what `kvmmu experiment a
--duration <d>` runs for that pair - in a fresh spawned process (one process holds the pair's three
VMs on their shared host), which reports its own CPU time (`time.process_time`) and VmHWM.

    python -m benchmarks.experiment [--duration 1] [--pairs shadow/generation ept/off ...]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time

from .harness import Figure, render
from .kcompile import _peak_rss_mb

CPU_PER_MODELLED_TARGET = 2.0       # CPU seconds per modelled second, at most (issue 18)
RSS_TARGET_MB = 150                 # per VM process (here: the pair's process), at most


def run_pair(flavour: str, policy: str, duration: float, seed: int = 1) -> dict[str, float]:
    from kvmmu.report.experiments import seed_a_scenario
    sc = seed_a_scenario(duration, seed, flavour, policy)
    c0 = time.process_time()
    r = sc.run()
    cpu = time.process_time() - c0
    return {"cpu": cpu, "modelled": r.modelled_s, "rss_mb": _peak_rss_mb(),
            "mmio": r.total("mmio_accesses"), "jobs": r.total("jobs_finished")}


def _child(args: tuple[str, str, float, int]) -> dict[str, float]:
    return run_pair(*args)


def bench_experiment_a(duration: float = 1.0, pairs: list[tuple[str, str]] | None = None,
                       workers: int = 1) -> list[Figure]:
    from kvmmu.report.experiments import CONFIGS
    todo = list(pairs or CONFIGS)
    ctx = mp.get_context("spawn")          # fresh interpreters: CPU and RSS are the pair's own
    with ctx.Pool(workers, maxtasksperchild=1) as pool:
        results = pool.map(_child, [(f, p, duration, 1) for f, p in todo], chunksize=1)
    figs = []
    for (f, p), r in zip(todo, results, strict=True):
        figs.append(Figure(f"experiment (a) {f}/{p}: CPU s per modelled s", r["cpu"] / r["modelled"], "x",
                           CPU_PER_MODELLED_TARGET, at_most=True,
                           note=f"{r['modelled']:g} modelled s in {r['cpu']:.1f} CPU s; {r['mmio']:,} MMIO, "
                                f"{r['jobs']} jobs"))
    worst = max(results, key=lambda r: r["rss_mb"])
    figs.append(Figure("  experiment (a): peak RSS of a pair's process (worst pair)", worst["rss_mb"], "MB",
                       RSS_TARGET_MB, at_most=True, note="three 512 MiB VMs of one pair in one process"))
    return figs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.experiment", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=1.0, help="modelled seconds per pair")
    ap.add_argument("--pairs", nargs="+", metavar="FLAVOUR/POLICY", help="default: the six pairs of (a)")
    ap.add_argument("--workers", type=int, default=1, help="pairs run at once (CPU time is per process)")
    args = ap.parse_args(argv)
    pairs = [tuple(x.split("/", 1)) for x in args.pairs] if args.pairs else None
    print(render(bench_experiment_a(args.duration, pairs, args.workers)))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
