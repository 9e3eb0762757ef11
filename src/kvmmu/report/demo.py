"""`make demo`: experiment (a) of docs/experiments.md at a size that runs in about a minute."""

from __future__ import annotations

from .experiments import PartProgress, experiment_a

DEMO_DURATION_S = 0.25


def run_demo(seed: int = 1, progress: PartProgress | None = None, duration_s: float | None = None) -> str:
    text = experiment_a(DEMO_DURATION_S if duration_s is None else duration_s, seed, progress)
    return ("kvmmu demo: the seed's experiment (a), scaled down to a quarter of a modelled second\n"
            "(`kvmmu experiment a --full` is the modelled hour; docs/experiments.md has the tables).\n\n" + text)
