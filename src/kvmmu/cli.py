"""The `kvmmu` command line.  Errors a user can cause print one line and exit with status 2.

    kvmmu run SCENARIO.toml [--json | --csv]          one scenario -> KVM's counters and the modelled cost
    kvmmu compare SCENARIO.toml                       MMU flavours x MMIO policies, one table with ratios
    kvmmu explain [--mmu M] [--policy P] [--target T] one access, step by step
    kvmmu trace SCENARIO.toml [-e EVENT] [--export F] KVM's events as trace-cmd report prints them
    kvmmu stat SCENARIO.toml [-1 | -l] [-f REGEX]     kvm_stat: KVM's events, totals and rates
    kvmmu kvm-stat-report SCENARIO.toml               perf kvm stat report: VM exits by reason, with time
    kvmmu plot SCENARIO.toml -o FILE.png              counters over time / policy bars (needs matplotlib)
    kvmmu experiment a|b|c [--full]                   the seed's experiments (docs/experiments.md)
    kvmmu demo                                        experiment (a), small enough for about a minute
    kvmmu flavours | linux-boot [--trace DIR] | real-diff PATH...

Conventions (docs/cli.md): every argument is checked before anything runs; `--mmu` and `--policy`
name the MMU flavour(s) and MMIO policy(ies) in every command (a comma list where a command runs
several); progress with rate and ETA goes to stderr after a second of work (unless --quiet);
results go to stdout or --output; a closed pipe (`| head`) ends the command quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from .cliargs import (
    PLOT_SUFFIXES,
    SEED,
    Progress,
    add_alias,
    address,
    choice_list,
    emit,
    integer,
    load_scenario,
    output_file,
    seconds,
)
from .errors import KvmmuError, ScenarioError

FLAVOURS = ("shadow", "ept", "npt")
POLICIES = ("off", "zap", "generation")
OUTPUT = output_file()
SCENARIO_DEFAULT = "the scenario's"
_emit = emit
_load = load_scenario
__all__ = ["Progress", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:         # one line, exit 2 (argparse prints usage first)
        self.exit(2, f"kvmmu: error: {message} (see `{self.prog} --help`)\n")


def _mmu_option(sp: argparse.ArgumentParser, allowed: tuple[str, ...], default: str | None, many: bool) -> None:
    kind = choice_list(allowed, "MMU flavour", single=not many)
    what = "comma list of MMU flavours" if many else "the MMU flavour"
    sp.add_argument("--mmu", type=kind, default=None if default is None else kind(default),
                    help=f"{what} ({', '.join(allowed)}; default {default or SCENARIO_DEFAULT})")
    add_alias(sp, "--mmus", "mmu", kind)


def _policy_option(sp: argparse.ArgumentParser, default: str | None, many: bool) -> None:
    kind = choice_list(POLICIES, "MMIO policy", single=not many)
    what = "comma list of MMIO policies" if many else "the MMIO policy"
    sp.add_argument("--policy", type=kind, default=None if default is None else kind(default),
                    help=f"{what} ({', '.join(POLICIES)}; default {default or SCENARIO_DEFAULT})")
    add_alias(sp, "--policies", "policy", kind)


def _combos(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [(f, p) for f in args.mmu for p in args.policy]


def _progress(args: argparse.Namespace, label: str, **kw: object) -> Progress:
    return Progress(label, getattr(args, "quiet", False), **kw)  # type: ignore[arg-type]


# -- commands ---------------------------------------------------------------------------------------
TDP_MMU_HELP = "kvm.tdp_mmu for EPT/NPT: Y the TDP MMU (KVM's default), N the legacy MMU"


def _tdp_mmu(args: argparse.Namespace) -> bool | None:
    """--tdp-mmu Y|N: kvm.tdp_mmu for every VM (None: as the scenario says)."""
    value = getattr(args, "tdp_mmu", None)
    return None if value is None else value == "Y"


def _cmd_run(args: argparse.Namespace) -> int:
    from .report.render import run_csv, run_json, run_text
    sc = _load(args)
    if args.mmu or args.policy:
        sc = sc.with_policy(args.mmu[0] if args.mmu else None, args.policy[0] if args.policy else None)
    if _tdp_mmu(args) is not None:
        sc = sc.with_policy(tdp_mmu=_tdp_mmu(args))
    prog = _progress(args, f"run {sc.name}")
    res = sc.run(progress=prog)
    prog.done()
    emit(args, run_json(res) + "\n" if args.json else run_csv(res) if args.csv else run_text(res))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .report.render import compare_csv, compare_json, compare_text
    sc = _load(args)
    combos = _combos(args)
    prog = _progress(args, "compare")
    results = []
    for i, (f, p) in enumerate(combos):
        cb = prog.part(i, len(combos), f"compare {f}/{p}")
        results.append((f"{f}/{p}", sc.with_policy(f, p, _tdp_mmu(args)).run(progress=cb)))
    prog.done()
    emit(args, compare_json(results) + "\n" if args.json else compare_csv(results) if args.csv
          else compare_text(results))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from .report.explain import explain
    emit(args, explain(mmu=args.mmu[0], policy=args.policy[0], target=args.target, gva=args.gva, kind=args.kind,
                        warm=args.warm, memslot_change=args.memslot_change, swap_tables=args.swapped_tables,
                        plot=args.plot))
    return 0


def _plot_metrics(kind: str, metrics: list[str]) -> None:
    """Refuse a metric the chosen plot cannot draw, before anything runs."""
    from .guest.os import OS_COUNTERS
    from .kvm.stats import MODEL_COUNTERS, VCPU_STATS, VM_STATS
    from .scenario import SAMPLED
    known = SAMPLED if kind == "series" else (*VCPU_STATS, *VM_STATS, *MODEL_COUNTERS, *OS_COUNTERS)
    for m in metrics:
        if m not in known:
            raise ScenarioError(f"--metrics {m!r}: a {kind} plot draws {', '.join(known)}")
    if not metrics:
        raise ScenarioError("--metrics: name at least one counter")


def _cmd_plot(args: argparse.Namespace) -> int:
    from .report.plot import plot_compare, plot_missrate, plot_series, require_matplotlib
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    _plot_metrics("series" if args.kind == "missrate" else args.kind, metrics)
    for option, names in (("--mmu", args.mmu), ("--policy", args.policy)):
        if args.kind == "series" and names and len(names) > 1:
            raise ScenarioError(f"{option} {','.join(names)}: a series plot draws one run; give one (or use "
                                "--kind compare)")
    require_matplotlib()
    sc = _load(args)
    prog = _progress(args, f"plot {sc.name}")
    log = True if args.log else False if args.linear else None
    if args.kind == "series":
        if args.mmu or args.policy:
            sc = sc.with_policy(args.mmu[0] if args.mmu else None, args.policy[0] if args.policy else None)
        if not sc.sample_ms:
            sc.sample_ms = max(sc.duration_s * 1000 / 50, 0.01)
        res = sc.run(progress=prog)
        prog.done()
        plot_series(res, args.output, metrics, cumulative=args.cumulative, log=log)
    else:
        args.mmu = args.mmu or ["shadow", "ept"]
        args.policy = args.policy or list(POLICIES)
        combos = _combos(args)
        if args.kind == "missrate" and not sc.sample_ms:
            sc.sample_ms = max(sc.duration_s * 1000 / 50, 0.01)
        results = []
        for i, (f, p) in enumerate(combos):
            results.append((f"{f}/{p}", sc.with_policy(f, p).run(progress=prog.part(i, len(combos), f"{f}/{p}"))))
        prog.done()
        if args.kind == "missrate":
            plot_missrate(results, args.output, log=log)
        else:
            plot_compare(results, args.output, metrics, log=log)
    if not args.quiet:
        print(f"kvmmu: wrote {args.output}", file=sys.stderr)
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from .report import experiments
    from .sweep.experiment_a import experiment_a_on_engine
    if args.which == "b" and args.duration is not None:
        raise ScenarioError(f"--duration {args.duration:g}: experiment b counts accesses, not modelled time "
                            "(--duration applies to experiments a and c)")
    prog = _progress(args, f"experiment {args.which}")
    engine = {"results": args.results, "scheduler": args.scheduler, "workers": args.workers,
              "quiet": args.quiet}
    text = experiments.run_experiment(args.which, full=args.full, seed=args.seed, progress=prog,
                                      duration=args.duration, engine=engine, on_engine=experiment_a_on_engine)
    prog.done()
    emit(args, text)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .report.demo import run_demo
    prog = _progress(args, "demo: experiment (a)")
    text = run_demo(seed=args.seed, progress=prog)
    prog.done()
    emit(args, text)
    return 0


def _cmd_flavours(args: argparse.Namespace) -> int:
    from .report.experiments import METRICS
    from .report.flavours import flavour_matrix
    from .report.table import format_table
    policy = args.policy[0]
    tdp_mmu = _tdp_mmu(args) is not False
    prog = _progress(args, "flavours", total=len(args.mmu), unit="run")
    results = flavour_matrix(policy, args.iterations, args.seed, tuple(args.mmu), tdp_mmu=tdp_mmu, progress=prog)
    prog.done()
    rows = [[label, *[r.metric(where, name) for r in results]] for label, where, name in METRICS]
    rows.append(["modelled cycles per MMIO access", *[r.cycles / r.mmio_accesses for r in results]])
    head = (f"The driver loop ({args.iterations} iterations, MMIO policy {policy!r}) under each MMU; "
            "nested-ept runs it as L2 on L1's EPT.\n"
            f"KVM module parameters: tdp_mmu={'Y' if tdp_mmu else 'N'} (EPT/NPT on the "
            f"{'TDP' if tdp_mmu else 'legacy'} MMU; L2's shadow EPT is always the shadow MMU), "
            f"mmio_caching={'N' if policy == 'off' else 'Y'}\n\n")
    emit(args, head + format_table(["", *[r.flavour for r in results]], rows) + "\n")
    return 0


def _cmd_linux_boot(args: argparse.Namespace) -> int:
    from .guest.linux_boot import load_linux_boot
    from .report.linux_boot import format_linux_boot, run_linux_boot
    workload = load_linux_boot(args.trace) if args.trace else None
    prog = _progress(args, "linux-boot")
    report = run_linux_boot(tuple(args.mmu), tuple(args.policy), args.limit, profile=args.profile,
                            workload=workload, progress=prog)
    prog.done()
    emit(args, format_linux_boot(report) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvmmu", description="An executable model of the KVM x86 MMU: run guests, compare MMU "
                "flavours and MMIO policies, explain one access, trace, plot.")
    p.add_argument("--version", action="version", version="kvmmu 0.1.0")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def output(sp: argparse.ArgumentParser, kind: Callable[[str], str] = OUTPUT, required: bool = False,
               what: str = "the result") -> None:
        sp.add_argument("-o", "--output", type=kind, required=required,
                        help=f"write {what} to this file instead of stdout")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    def common(sp: argparse.ArgumentParser, out_kind: Callable[[str], str] = OUTPUT,
               out_required: bool = False) -> None:
        sp.add_argument("scenario", help="a scenario TOML file (see docs/cli.md)")
        sp.add_argument("--duration", type=seconds, help="modelled seconds (overrides duration_s)")
        sp.add_argument("--seed", type=SEED, help="the seed (overrides the scenario's)")
        sp.add_argument("--cost", help="cost-model overrides: a TOML or JSON file of parameter = cycles")
        output(sp, out_kind, out_required)

    r = sub.add_parser("run", help="run one scenario: KVM's counters and the modelled cost")
    common(r)
    _mmu_option(r, FLAVOURS, None, many=False)
    _policy_option(r, None, many=False)
    r.add_argument("--tdp-mmu", choices=("Y", "N"), help=TDP_MMU_HELP)
    g = r.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="machine-readable JSON")
    g.add_argument("--csv", action="store_true", help="CSV rows: vm,section,name,value")
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("compare", help="the same scenario under MMU flavours x MMIO policies, one table")
    common(c)
    _mmu_option(c, FLAVOURS, "shadow,ept", many=True)
    _policy_option(c, "off,zap,generation", many=True)
    c.add_argument("--tdp-mmu", choices=("Y", "N"), help=TDP_MMU_HELP)
    g = c.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true")
    g.add_argument("--csv", action="store_true")
    c.set_defaults(func=_cmd_compare)

    from .report.explain import TARGETS
    e = sub.add_parser("explain", help="one access on the default machine, step by step")
    output(e)
    _mmu_option(e, FLAVOURS, "shadow", many=False)
    _policy_option(e, "generation", many=False)
    e.add_argument("--target", default="doorbell", choices=tuple(TARGETS),
                   help="what the access touches: " + " | ".join(TARGETS))
    e.add_argument("--gva", type=address, help="an explicit guest-linear address instead of --target")
    e.add_argument("--kind", choices=("read", "write", "fetch"), default=None,
                   help="the access (default: what the target usually gets)")
    e.add_argument("--warm", type=integer(0, 1000, "a number of warm-up accesses"), default=1,
                   help="identical accesses before the explained one (0-1000, default 1)")
    e.add_argument("--memslot-change", action="store_true",
                   help="the VMM creates a memslot just before the explained access")
    e.add_argument("--swapped-tables", action="store_true",
                   help="the host swaps out the guest's page-table pages just before the explained access")
    e.add_argument("--plot", metavar="FILE.png", help="also draw the access's walk (needs matplotlib)")
    e.set_defaults(func=_cmd_explain)

    from .report.tracecli import add_cli as add_trace_tools
    add_trace_tools(sub, common)

    pl = sub.add_parser("plot", help="charts (PNG, SVG or PDF; needs the optional extra: pip install 'kvmmu[plot]')")
    common(pl, output_file(PLOT_SUFFIXES), out_required=True)
    pl.add_argument("--kind", choices=("series", "compare", "missrate"), default="series",
                    help="series: counters over modelled time (per-interval rates); compare: bars per "
                         "flavour/policy; missrate: the MMIO miss rate per interval, one line per flavour/policy")
    pl.add_argument("--cumulative", action="store_true", help="(series) running totals instead of rates")
    scale = pl.add_mutually_exclusive_group()
    scale.add_argument("--log", action="store_true", help="a log scale (default: when values span 100x)")
    scale.add_argument("--linear", action="store_true", help="a linear scale")
    pl.add_argument("--metrics", default="mmio_fast_path,mmio_slow_path,pf_taken,exits",
                    help="comma list of counters to draw")
    _mmu_option(pl, FLAVOURS, None, many=True)
    _policy_option(pl, None, many=True)
    pl.set_defaults(func=_cmd_plot)

    x = sub.add_parser("experiment", help="the seed's experiments (a), (b), (c) of docs/experiments.md")
    x.add_argument("which", choices=("a", "b", "c"))
    x.add_argument("--full", action="store_true",
                   help="the full size (a: one modelled hour per pair, its six pairs as cells on Dask, resumable)")
    x.add_argument("--results", help="(a --full) the result store (default .kvmmu-sweeps/experiment-a-...)")
    x.add_argument("--scheduler", metavar="ADDRESS", help="(a --full) a running Dask scheduler")
    x.add_argument("--workers", type=integer(1, 256, "a number of local worker processes"), default=2,
                   help="(a --full) local worker processes (default 2)")
    x.add_argument("--duration", type=seconds, help="modelled seconds (a, c) instead of the preset")
    x.add_argument("--seed", type=SEED, default=1)
    output(x)
    x.set_defaults(func=_cmd_experiment)

    d = sub.add_parser("demo", help="experiment (a) at a size that runs in about a minute")
    d.add_argument("--seed", type=SEED, default=1)
    output(d)
    d.set_defaults(func=_cmd_demo)

    from .report.flavours import FLAVOURS as ALL_FLAVOURS
    fl = sub.add_parser("flavours", help="one workload under shadow, EPT, NPT and nested EPT, side by side")
    _mmu_option(fl, ALL_FLAVOURS, ",".join(ALL_FLAVOURS), many=True)
    _policy_option(fl, "generation", many=False)
    fl.add_argument("--iterations", type=integer(1, 10**7, "a number of loop iterations"), default=1000)
    fl.add_argument("--tdp-mmu", choices=("Y", "N"), help=TDP_MMU_HELP)
    fl.add_argument("--seed", type=SEED, default=1)
    output(fl)
    fl.set_defaults(func=_cmd_flavours)

    lb = sub.add_parser("linux-boot", help="replay a recorded Linux-boot MMIO trace (docs/workloads.md)")
    lb.add_argument("--trace", metavar="DIR", help="a recorded trace directory (default: the shipped boot)")
    lb.add_argument("--limit", type=integer(1, 10**9, "a number of MMIO accesses"), default=None,
                    help="replay only the first N MMIO accesses")
    _mmu_option(lb, FLAVOURS, "shadow,ept", many=True)
    add_alias(lb, "--flavours", "mmu", choice_list(FLAVOURS, "MMU flavour"))
    _policy_option(lb, "off,zap,generation", many=True)
    lb.add_argument("--profile", default="irqchip", choices=("irqchip", "qemu"))
    output(lb)
    lb.set_defaults(func=_cmd_linux_boot)

    from .sweep import add_cli as add_sweep
    add_sweep(sub)
    from .realdiff.cli import add_cli as add_real_diff
    rd = add_real_diff(sub)
    output(rd)
    from .lab.cli import add_cli as add_lab
    from .lab.cli import real_diff_recorded
    rd.set_defaults(on_recorded=real_diff_recorded)      # real-diff --recorded: the lab's results files
    add_lab(sub)
    return p


def _closed_pipe() -> int:
    """stdout's reader went away (`kvmmu ... | head`): stop quietly, as `seq | head` does."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 128 + 13                                  # what a shell reports for SIGPIPE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:              # --help, --version, or a bad argument (already printed)
            return exc.code if isinstance(exc.code, int) else 2
        return int(args.func(args))
    except KvmmuError as exc:
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        msg = str(exc).replace("\n", " ")
        print(f"kvmmu: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt:
        print("kvmmu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
