"""What every benchmark shares: a figure, a timer, the one table `make bench` prints, RSS readings."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmmu.report.table import format_table


@dataclass
class Figure:
    """One line of the table.

    `target` is a lower bound (higher is better) unless `at_most` is set, in which case it is an upper
    bound.  The ratio printed is always oriented so that >= 1.00 means the target is met.
    """

    name: str
    value: float | None
    unit: str
    target: float | None = None
    at_most: bool = False
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.target is None:
            return None
        if self.at_most:
            return self.target / self.value if self.value else float("inf")
        return self.value / self.target

    @property
    def met(self) -> bool | None:
        r = self.ratio
        return None if r is None else r >= 1.0


def best_rate(run: Callable[[], tuple[int, float]], repeats: int) -> tuple[float, int, float]:
    """Call `run` (which returns (operations, seconds)) `repeats` times; the best rate wins.

    Returns (rate, operations, seconds) of the best run.  The garbage collector is left on: its cost
    is part of what a user pays.
    """
    best = (0.0, 0, 0.0)
    for _ in range(repeats):
        gc.collect()
        ops, secs = run()
        rate = ops / secs if secs > 0 else float("inf")
        if rate > best[0]:
            best = (rate, ops, secs)
    return best


def clock() -> float:
    """CPU seconds of this process (user + system, KVM_RUN's kernel time included).

    The machines these figures are for are shared: wall-clock time would measure the neighbours.
    The CPU time of a single-threaded benchmark is what one core delivers to it.
    """
    return time.process_time()




def _num(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit in ("x", "MB") or v < 100:
        return f"{v:,.2f}"
    return f"{v:,.0f}"


def render(figures: list[Figure]) -> str:
    rows = []
    for f in figures:
        if f.target is None:
            target = "-"
        else:
            target = ("<= " if f.at_most else ">= ") + _num(f.target, f.unit)
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}"
        met = "" if f.met is None else ("ok" if f.met else "MISSED")
        rows.append((f.name, _num(f.value, f.unit), f.unit, target, ratio, met, f.note))
    return format_table(("figure", "value", "unit", "target", "ratio", "", "note"), rows)
