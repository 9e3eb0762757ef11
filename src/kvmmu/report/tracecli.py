"""The commands KVM engineers know from the host: `trace` (trace-cmd record + report), `stat`
(kvm_stat) and `kvm-stat-report` (perf kvm stat report), each run on a modelled scenario."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..errors import ScenarioError
from ..kvm.tracepoints import TRACEPOINTS, select_events, subsystem


def add_cli(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    t = sub.add_parser("trace", help="run a scenario and print KVM's events as trace-cmd report does")
    common(t)
    t.add_argument("-e", "--events", action="append", metavar="EVENT",
                   help="an event, a subsystem (kvm, kvmmmu, kvmmu) or SYSTEM:GLOB; repeat or comma-separate "
                        "(default: kvm and kvmmmu, every event a real host records)")
    t.add_argument("--head", type=int, metavar="N", help="print only the first N events (all by default)")
    t.add_argument("--list", action="store_true", help="list the events and their subsystems, then exit")
    t.add_argument("--export", metavar="FILE.pftrace",
                   help="also write a Perfetto trace (open it in ui.perfetto.dev)")
    t.set_defaults(func=_cmd_trace)

    s = sub.add_parser("stat", help="kvm_stat for a scenario: KVM's events, totals and rates per modelled second")
    common(s)
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("-1", "--once", "--batch", dest="batch", action="store_true",
                      help="one report: each event's total and its rate over the run")
    mode.add_argument("-l", "--log", action="store_true", help="one line of per-interval counts per sample")
    s.add_argument("-f", "--fields", metavar="REGEX", help="only events whose name matches")
    s.add_argument("-g", "--guest", metavar="VM", help="only this VM (by its scenario name)")
    s.add_argument("--interval", type=float, default=0.01, metavar="S",
                   help="sampling interval in modelled seconds (default 0.01)")
    s.set_defaults(func=_cmd_stat)

    r = sub.add_parser("kvm-stat-report",
                       help="perf kvm stat report for a scenario: VM exits by reason with their modelled time")
    common(r)
    r.add_argument("--vm", metavar="VM", help="only this VM (by its scenario name)")
    r.set_defaults(func=_cmd_kvm_stat_report)


def _events_arg(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [x.strip() for v in values for x in v.split(",")]
    select_events(out)                        # refuse unknown names before anything runs
    return out


def _cmd_trace(args: argparse.Namespace) -> int:
    from ..cliargs import Progress
    from ..cliargs import emit as _emit
    from ..cliargs import load_scenario as _load
    from .tracefmt import capture_scenario, render_report
    if args.list:
        _emit(args, "".join(f"{subsystem(n)}:{n}\n" for n in sorted(TRACEPOINTS, key=lambda n: (subsystem(n), n))))
        return 0
    events = _events_arg(args.events)
    if args.head is not None and args.head < 1:
        raise ScenarioError(f"--head {args.head}: must be at least 1")
    if args.export:
        from .traceexport import _schema
        _schema()                             # the optional dependency, checked before the run
    sc = _load(args)
    prog = Progress(f"trace {sc.name}", args.quiet)
    cap = capture_scenario(sc, events=events, progress=prog)
    prog.done()
    if args.export:
        from .traceexport import write_perfetto
        n = write_perfetto(cap, args.export)
        print(f"kvmmu: wrote {args.export} ({n:,} bytes, {len(cap.records):,} events)", file=sys.stderr)
    _emit(args, render_report(cap, head=args.head))
    return 0


def _cmd_stat(args: argparse.Namespace) -> int:
    from ..cliargs import Progress
    from ..cliargs import emit as _emit
    from ..cliargs import load_scenario as _load
    from .kvmstat import collect_stats, render_batch, render_log, render_table
    sc = _load(args)
    live = not (args.batch or args.log or args.output) and sys.stdout.isatty()
    if live:
        return _live(sc, args)
    prog = Progress(f"stat {sc.name}", args.quiet)
    run = collect_stats(sc, args.interval, progress=prog)
    prog.done()
    render: Any = render_batch if args.batch else render_log if args.log else render_table
    _emit(args, render(run, vm=args.guest, fields_re=args.fields))
    return 0


def _live(sc: Any, args: argparse.Namespace) -> int:
    """kvm_stat's interactive display: the table redrawn as the modelled run advances."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from .kvmstat import collect_stats, render_table
    console = Console()
    with Live(Text("starting..."), console=console, refresh_per_second=4, transient=False) as live:
        def show(run: Any) -> None:
            live.update(Text(render_table(run, vm=args.guest, fields_re=args.fields)))
        run = collect_stats(sc, args.interval, on_sample=show)
        show(run)
    return 0


def _cmd_kvm_stat_report(args: argparse.Namespace) -> int:
    from ..cliargs import Progress
    from ..cliargs import emit as _emit
    from ..cliargs import load_scenario as _load
    from .kvmstat import render_perf_kvm_stat
    from .tracefmt import capture_scenario
    sc = _load(args)
    if args.vm is not None and args.vm not in [v.spec.name for v in sc.vms]:
        raise ScenarioError(f"--vm {args.vm!r}: no such VM; the VMs are {', '.join(v.spec.name for v in sc.vms)}")
    prog = Progress(f"kvm-stat-report {sc.name}", args.quiet)
    cap = capture_scenario(sc, events=["kvm:kvm_exit"], progress=prog)
    prog.done()
    _emit(args, render_perf_kvm_stat(cap.exit_times, cap.vm_names, vm=args.vm))
    return 0
