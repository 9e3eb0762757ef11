"""The `kvmmu` command line.  Errors a user can cause print one line and exit with status 2.

    kvmmu run SCENARIO.toml [--json | --csv]          one scenario -> KVM's counters and the modelled cost
    kvmmu compare SCENARIO.toml                       MMU flavours x MMIO policies, one table with ratios
    kvmmu explain [--mmu M] [--policy P] [--target T] one access, step by step
    kvmmu trace SCENARIO.toml                         the event stream, trace-cmd style
    kvmmu plot SCENARIO.toml -o FILE.png              counters over time / policy bars (needs matplotlib)
    kvmmu experiment a|b|c [--full]                   the seed's experiments (docs/experiments.md)
    kvmmu demo                                        experiment (a), small enough for about a minute

Progress goes to stderr (after a second of work, unless --quiet); results go to stdout or --output.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .errors import KvmmuError, ScenarioError

FLAVOURS = ("shadow", "ept", "npt")
POLICIES = ("off", "zap", "generation")


class Progress:
    """A one-line progress bar on stderr, shown only once the work has taken more than a second."""

    def __init__(self, label: str, quiet: bool, stream: TextIO | None = None) -> None:
        self.label = label
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.shown = False
        self.base = 0.0
        self.span = 1.0
        self.last = 0.0
        self.last_f = 0.0

    def part(self, index: int, count: int, label: str) -> Callable[[float], None]:
        """A callback for part `index` of `count` (fractions of the part map into the whole)."""
        self.base, self.span = index / count, 1 / count
        self.label = label
        self(0.0)
        return self

    def __call__(self, fraction: float) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not self.shown and now - self.t0 < 1.0:
            return
        f = min(1.0, self.base + self.span * fraction)
        tty = self.stream.isatty()
        # A terminal gets a bar redrawn at most 5 times a second; a pipe a line every 25 %.
        if tty and now - self.last < 0.2 or not tty and int(f * 4) <= int(self.last_f * 4) and self.shown:
            return
        self.shown = True
        self.last, self.last_f = now, f
        bar = "#" * int(30 * f)
        line = f"{self.label[:40]:<40} [{bar:<30}] {100 * f:5.1f}% {now - self.t0:6.1f}s"
        self.stream.write(f"\r{line}" if tty else f"{line}\n")
        self.stream.flush()

    def done(self) -> None:
        if self.shown and not self.quiet and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:          # one line, exit 2 (argparse prints usage first)
        self.exit(2, f"kvmmu: error: {message} (see `{self.prog} --help`)\n")


def _csv_list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    for x in items:
        if x not in allowed:
            raise ScenarioError(f"{what} {x!r}: choose from {', '.join(allowed)}")
    if not items:
        raise ScenarioError(f"{what}: give at least one of {', '.join(allowed)}")
    return items


def _load(args: argparse.Namespace):
    from .report.cost import CostModel
    from .scenario import Scenario
    sc = Scenario.load(args.scenario)
    sc = sc.scaled(duration_s=args.duration, seed=args.seed)
    if getattr(args, "mmu", None) or getattr(args, "policy", None):
        sc = sc.with_policy(getattr(args, "mmu", None), getattr(args, "policy", None))
    if getattr(args, "cost", None):
        sc.cost = CostModel.from_file(args.cost)
    return sc


def _emit(args: argparse.Namespace, text: str) -> None:
    out = getattr(args, "output", None)
    if out:
        try:
            Path(out).write_text(text, encoding="utf-8")
        except OSError as e:
            raise ScenarioError(f"--output {out!r}: cannot write it ({e.strerror})") from None
    else:
        sys.stdout.write(text)


# -- commands ---------------------------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace) -> int:
    from .report.render import run_csv, run_json, run_text
    sc = _load(args)
    prog = Progress(f"run {sc.name}", args.quiet)
    res = sc.run(progress=prog)
    prog.done()
    _emit(args, run_json(res) + "\n" if args.json else run_csv(res) if args.csv else run_text(res))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .report.render import compare_csv, compare_json, compare_text
    sc = _load(args)
    flavours = _csv_list(args.mmus, FLAVOURS, "--mmus")
    policies = _csv_list(args.policies, POLICIES, "--policies")
    combos = [(f, p) for f in flavours for p in policies]
    prog = Progress("compare", args.quiet)
    results = []
    for i, (f, p) in enumerate(combos):
        cb = prog.part(i, len(combos), f"compare {f}/{p}")
        results.append((f"{f}/{p}", sc.with_policy(f, p).run(progress=cb)))
    prog.done()
    _emit(args, compare_json(results) + "\n" if args.json else compare_csv(results) if args.csv
          else compare_text(results))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from .report.explain import explain
    gva = int(args.gva, 0) if args.gva else None
    _emit(args, explain(mmu=args.mmu or "shadow", policy=args.policy or "generation", target=args.target,
                        gva=gva, kind=args.kind, warm=args.warm, memslot_change=args.memslot_change,
                        swap_tables=args.swapped_tables))
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from .report.tracefmt import trace_scenario
    sc = _load(args)
    events = _csv_list(args.events, tuple(args.events.split(",")), "--events") if args.events else None
    prog = Progress(f"trace {sc.name}", args.quiet)
    text = trace_scenario(sc, events=events, limit=args.max_events, progress=prog)
    prog.done()
    _emit(args, text)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .report.plot import plot_compare, plot_series, require_matplotlib
    require_matplotlib()
    sc = _load(args)
    prog = Progress(f"plot {sc.name}", args.quiet)
    if args.kind == "series":
        if not sc.sample_ms:
            sc.sample_ms = max(sc.duration_s * 1000 / 50, 0.01)
        res = sc.run(progress=prog)
        plot_series(res, args.output, args.metrics.split(","))
    else:
        flavours = _csv_list(args.mmus, FLAVOURS, "--mmus")
        policies = _csv_list(args.policies, POLICIES, "--policies")
        combos = [(f, p) for f in flavours for p in policies]
        results = []
        for i, (f, p) in enumerate(combos):
            results.append((f"{f}/{p}", sc.with_policy(f, p).run(progress=prog.part(i, len(combos), f"{f}/{p}"))))
        plot_compare(results, args.output, args.metrics.split(","))
    prog.done()
    if not args.quiet:
        print(f"kvmmu: wrote {args.output}", file=sys.stderr)
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from .report import experiments
    prog = Progress(f"experiment {args.which}", args.quiet)
    text = experiments.run_experiment(args.which, full=args.full, seed=args.seed, progress=prog,
                                      duration=args.duration)
    prog.done()
    _emit(args, text)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .report.demo import run_demo
    prog = Progress("demo: experiment (a)", args.quiet)
    text = run_demo(seed=args.seed, progress=prog)
    prog.done()
    _emit(args, text)
    return 0


def _cmd_flavours(args: argparse.Namespace) -> int:
    from .report.experiments import METRICS
    from .report.flavours import FLAVOURS as ALL_FLAVOURS
    from .report.flavours import flavour_matrix
    from .report.table import format_table
    flavours = tuple(_csv_list(args.mmus, ALL_FLAVOURS, "--mmus"))
    policy = _csv_list(args.policy, POLICIES, "--policy")[0]
    if args.iterations <= 0:
        raise ScenarioError(f"--iterations {args.iterations}: must be a positive number of loop iterations")
    results = flavour_matrix(policy, args.iterations, args.seed, flavours)
    rows = [[label, *[r.metric(where, name) for r in results]] for label, where, name in METRICS]
    rows.append(["modelled cycles per MMIO access", *[r.cycles / r.mmio_accesses for r in results]])
    head = (f"The driver loop ({args.iterations} iterations, MMIO policy {policy!r}) under each MMU; "
            "nested-ept runs it as L2 on L1's EPT.\n\n")
    _emit(args, head + format_table(["", *[r.flavour for r in results]], rows) + "\n")
    return 0


def _cmd_linux_boot(args: argparse.Namespace) -> int:
    from .report.linux_boot import format_linux_boot, run_linux_boot
    if args.limit is not None and args.limit <= 0:
        raise ScenarioError(f"--limit {args.limit}: must be a positive number of MMIO accesses")
    flavours = tuple(_csv_list(args.mmus, FLAVOURS, "--mmus"))
    policies = tuple(_csv_list(args.policies, POLICIES, "--policies"))
    report = run_linux_boot(flavours, policies, args.limit, profile=args.profile)
    _emit(args, format_linux_boot(report) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvmmu", description="An executable model of the KVM x86 MMU: run guests, compare MMU "
                "flavours and MMIO policies, explain one access, trace, plot.")
    p.add_argument("--version", action="version", version="kvmmu 0.1.0")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp: argparse.ArgumentParser, scenario: bool = True) -> None:
        if scenario:
            sp.add_argument("scenario", help="a scenario TOML file (see docs/cli.md)")
            sp.add_argument("--duration", type=float, help="modelled seconds (overrides duration_s)")
            sp.add_argument("--seed", type=int, help="the seed (overrides the scenario's)")
            sp.add_argument("--cost", help="cost-model overrides: a TOML or JSON file of parameter = cycles")
        sp.add_argument("-o", "--output", help="write the result to this file instead of stdout")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    r = sub.add_parser("run", help="run one scenario: KVM's counters and the modelled cost")
    common(r)
    r.add_argument("--mmu", choices=FLAVOURS, help="override every VM's MMU flavour")
    r.add_argument("--policy", choices=POLICIES, help="override every VM's MMIO policy")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="machine-readable JSON")
    g.add_argument("--csv", action="store_true", help="CSV rows: vm,section,name,value")
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("compare", help="the same scenario under MMU flavours x MMIO policies, one table")
    common(c)
    c.add_argument("--mmus", default="shadow,ept", help="comma list of MMU flavours (default shadow,ept)")
    c.add_argument("--policies", default="off,zap,generation", help="comma list of MMIO policies")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true")
    g.add_argument("--csv", action="store_true")
    c.set_defaults(func=_cmd_compare)

    e = sub.add_parser("explain", help="one access on the default machine, step by step")
    common(e, scenario=False)
    e.add_argument("--mmu", choices=FLAVOURS, default="shadow")
    e.add_argument("--policy", choices=POLICIES, default="generation")
    e.add_argument("--target", default="doorbell",
                   help="doorbell | status | lapic | serial | testdev | ram | user (what the access touches)")
    e.add_argument("--gva", help="an explicit guest-linear address instead of --target")
    e.add_argument("--kind", choices=("read", "write", "fetch"), default=None,
                   help="the access (default: what the target usually gets)")
    e.add_argument("--warm", type=int, default=1, help="identical accesses before the explained one (default 1)")
    e.add_argument("--memslot-change", action="store_true",
                   help="the VMM creates a memslot just before the explained access")
    e.add_argument("--swapped-tables", action="store_true",
                   help="the host swaps out the guest's page-table pages just before the explained access")
    e.set_defaults(func=_cmd_explain)

    t = sub.add_parser("trace", help="run a scenario and print KVM's events, trace-cmd style")
    common(t)
    t.add_argument("--events", help="comma list of event names to keep (default: all)")
    t.add_argument("--max-events", type=int, default=2000, help="stop printing after this many (default 2000)")
    t.set_defaults(func=_cmd_trace)

    pl = sub.add_parser("plot", help="PNG charts (needs the optional extra: pip install 'kvmmu[plot]')")
    common(pl)
    pl.add_argument("--kind", choices=("series", "compare"), default="series",
                    help="series: counters over modelled time; compare: bars per flavour/policy")
    pl.add_argument("--metrics", default="mmio_fast_path,mmio_slow_path,pf_taken,exits",
                    help="comma list of counters to draw")
    pl.add_argument("--mmus", default="shadow,ept")
    pl.add_argument("--policies", default="off,zap,generation")
    pl.set_defaults(func=_cmd_plot)

    x = sub.add_parser("experiment", help="the seed's experiments (a), (b), (c) of docs/experiments.md")
    x.add_argument("which", choices=("a", "b", "c"))
    x.add_argument("--full", action="store_true", help="the full size (a: one modelled hour; slow)")
    x.add_argument("--duration", type=float, help="modelled seconds (a, c) instead of the preset")
    x.add_argument("--seed", type=int, default=1)
    x.add_argument("-o", "--output")
    x.add_argument("-q", "--quiet", action="store_true")
    x.set_defaults(func=_cmd_experiment)

    d = sub.add_parser("demo", help="experiment (a) at a size that runs in about a minute")
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("-o", "--output")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=_cmd_demo)

    fl = sub.add_parser("flavours", help="one workload under shadow, EPT, NPT and nested EPT, side by side")
    fl.add_argument("--mmus", default="shadow,ept,npt,nested-ept")
    fl.add_argument("--policy", default="generation")
    fl.add_argument("--iterations", type=int, default=1000)
    fl.add_argument("--seed", type=int, default=1)
    fl.add_argument("-o", "--output")
    fl.set_defaults(func=_cmd_flavours)

    lb = sub.add_parser("linux-boot", help="replay the recorded Linux-boot MMIO trace (docs/workloads.md)")
    lb.add_argument("--limit", type=int, default=None, help="replay only the first N MMIO accesses")
    lb.add_argument("--mmus", default="shadow,ept")
    lb.add_argument("--policies", default="off,zap,generation")
    lb.add_argument("--profile", default="irqchip", choices=("irqchip", "qemu"))
    lb.add_argument("-o", "--output")
    lb.set_defaults(func=_cmd_linux_boot)

    from .report.realdiff import add_cli as add_real_diff
    add_real_diff(sub)
    from .lab.cli import add_cli as add_lab
    add_lab(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "output", None) == "" and args.command == "plot":
        parser.error("plot needs --output FILE.png")
    if args.command == "plot" and not args.output:
        print("kvmmu: error: plot needs -o/--output FILE.png", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except KvmmuError as exc:
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        msg = str(exc).replace("\n", " ")
        print(f"kvmmu: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvmmu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
