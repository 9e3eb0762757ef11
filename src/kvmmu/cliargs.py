"""The command line's foundation: argument types that validate before anything runs, and progress.

Every type below is an argparse ``type=`` callable: a bad value becomes one line
``kvmmu: error: argument --gva: 'zzz' is not an address ...`` and exit status 2, before any
scenario is loaded or any guest runs (docs/cli.md, "Conventions").
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from tqdm import tqdm

if TYPE_CHECKING:
    from .scenario import Scenario

U64 = 1 << 64
MAX_DURATION_S = 86400.0
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _bad(text: str, rule: str) -> argparse.ArgumentTypeError:
    shown = text if len(text) <= 200 else text[:197] + "..."
    return argparse.ArgumentTypeError(f"{shown!r}: {rule}")


def address(text: str) -> int:
    """A guest address: hex with 0x, or decimal; 0 to 2^64 - 1."""
    try:
        value = int(text, 0)
    except ValueError:
        raise _bad(text, "is not an address: give hex (0x...) or decimal digits") from None
    if not 0 <= value < U64:
        raise _bad(text, "an address is 0 to 2^64-1")
    return value


def integer(lo: int, hi: int, what: str) -> Callable[[str], int]:
    """An integer in [lo, hi] (decimal, or 0x hex)."""
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise _bad(text, f"{what} is an integer") from None
        if not lo <= value <= hi:
            raise _bad(text, f"{what} is {lo} to {hi:,}")
        return value
    parse.__name__ = what
    return parse


def seconds(text: str) -> float:
    """Modelled seconds: a finite number > 0 and at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise _bad(text, "is not a number of modelled seconds") from None
    if not math.isfinite(value) or not 0 < value <= MAX_DURATION_S:
        raise _bad(text, f"a modelled duration is > 0 and at most {MAX_DURATION_S:g} seconds")
    return value


SEED = integer(0, U64 - 1, "a seed")


def choice_list(allowed: Iterable[str], what: str, single: bool = False) -> Callable[[str], list[str]]:
    """A comma list of names from `allowed` (at least one; one only if `single`)."""
    names = tuple(allowed)

    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise _bad(text, f"give at least one {what}: {', '.join(names)}")
        for x in items:
            if x not in names:
                raise _bad(x, f"unknown {what}; choose from {', '.join(names)}")
        if single and len(items) > 1:
            raise _bad(text, f"give one {what}")
        if len(set(items)) != len(items):
            raise _bad(text, f"a {what} is named twice")
        return items
    parse.__name__ = what
    return parse


def output_file(suffixes: tuple[str, ...] | None = None) -> Callable[[str], str]:
    """A file to write: not a directory, in a directory that exists, with one of `suffixes`."""
    def parse(text: str) -> str:
        if not text:
            raise _bad(text, "give a file name")
        p = Path(text)
        if p.is_dir():
            raise _bad(text, "is a directory; give a file name")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise _bad(text, f"the directory {str(parent)!r} does not exist")
        if p.exists() and not os.access(p, os.W_OK) or not p.exists() and not os.access(parent, os.W_OK):
            raise _bad(text, "cannot be written (permission denied)")
        if suffixes is not None and p.suffix.lower() not in suffixes:
            raise _bad(text, f"the file type comes from its suffix: one of {', '.join(suffixes)}")
        return text
    parse.__name__ = "output file"
    return parse


def emit(args: argparse.Namespace, text: str) -> None:
    """A command's result: to --output if given (checked by `output_file` before the command ran), else
    stdout."""
    from .errors import ScenarioError
    out = getattr(args, "output", None)
    if out:
        try:
            Path(out).write_text(text, encoding="utf-8")
        except OSError as e:
            raise ScenarioError(f"--output {out!r}: cannot write it ({e.strerror})") from None
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def load_scenario(args: argparse.Namespace) -> Scenario:
    """The scenario a subcommand's arguments name, scaled to --duration/--seed, with --cost applied."""
    from .scenario import Scenario as _Scenario
    from .sim.cost import CostModel
    sc = _Scenario.load(args.scenario)
    sc = sc.scaled(duration_s=args.duration, seed=args.seed)
    if getattr(args, "cost", None):
        sc.cost = CostModel.from_file(args.cost)
    return sc


def add_alias(parser: argparse.ArgumentParser, alias: str, dest: str, type_: Callable[[str], object]) -> None:
    """A hidden second spelling of an option (kept so old command lines keep working)."""
    parser.add_argument(alias, dest=dest, type=type_, help=argparse.SUPPRESS, default=argparse.SUPPRESS)


# -- progress ----------------------------------------------------------------------------------------
class Progress:
    """Progress on stderr with rate and ETA (tqdm's meter), shown only once the work has taken more
    than a second; silent with `quiet`.

    A terminal gets one bar redrawn in place; anything else (a pipe, a log file) gets whole lines,
    one per 25 % and a last one at 100 %.  Callers report fractions of the work (``progress(0.3)``)
    or of one part of it (`part`); `done` brings the meter to 100 %.
    """

    def __init__(self, label: str, quiet: bool = False, stream: TextIO | None = None, *,
                 total: float = 100.0, unit: str = "%", delay: float = 1.0) -> None:
        self.label = label
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.total, self.unit, self.delay = total, unit, delay
        self.t0 = time.monotonic()
        self.base, self.span = 0.0, 1.0
        self.fraction = 0.0
        self.last_line = -1.0                   # the fraction of the last line written (pipes)
        self.bar: tqdm | None = None
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False

    def part(self, index: int, count: int, label: str) -> Progress:
        """Report the next fractions for part `index` of `count` (they map into the whole)."""
        self.base, self.span = index / count, 1 / count
        self.label = label
        self(0.0)
        return self

    @property
    def _bar_format(self) -> str | None:
        if self.unit == "%":
            return "{desc}: {percentage:5.1f}%|{bar}| [{elapsed}<{remaining}, {rate_fmt}]"
        return None

    def _n(self, fraction: float) -> float:
        n = fraction * self.total
        return int(n) if isinstance(self.total, int) else n

    def _meter(self, fraction: float) -> str:
        elapsed = time.monotonic() - self.t0
        return tqdm.format_meter(self._n(fraction), self.total, elapsed, prefix=self.label[:40], unit=self.unit,
                                 ncols=100, ascii=True, bar_format=self._bar_format)

    def __call__(self, fraction: float) -> None:
        if self.quiet:
            return
        f = min(1.0, max(self.fraction, self.base + self.span * max(0.0, fraction)))
        self.fraction = f
        if not self.shown and time.monotonic() - self.t0 < self.delay:
            return
        if self.tty:
            if self.bar is None:
                self.bar = tqdm(total=self.total, desc=self.label[:40], unit=self.unit, file=self.stream,
                                leave=True, mininterval=0.2, dynamic_ncols=True, bar_format=self._bar_format)
                # the meter's clock starts when the work did, not when the bar first shows
                self.bar.start_t -= time.monotonic() - self.t0
            self.bar.set_description_str(self.label[:40], refresh=False)
            self.bar.update(self._n(f) - self.bar.n)
        elif int(f * 4) > int(self.last_line * 4) or f >= 1.0 > self.last_line:
            self.last_line = f
            self.stream.write(self._meter(f) + "\n")
            self.stream.flush()

    @property
    def shown(self) -> bool:
        return self.bar is not None or self.last_line >= 0

    def done(self) -> None:
        """The work is complete: a meter that was shown ends at 100 %."""
        if self.quiet or not self.shown:
            return
        self.base, self.span = 0.0, 1.0
        self(1.0)
        if self.bar is not None:
            self.bar.close()
            self.bar = None
