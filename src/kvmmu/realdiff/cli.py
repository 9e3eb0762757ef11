"""``kvmmu real-diff``: run corpus programs on the model and on /dev/kvm (or against a lab recording)
and print the report."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import ScenarioError
from ..guest.runtime import Program
from .compare import diff_program
from .corpus import load_programs
from .format import format_report, report_json

DESCRIPTION = "The differential runner: the same guest bytes on the model and on the real /dev/kvm."


def _cmd(args: argparse.Namespace) -> int:
    from ..cliargs import Progress, emit
    from ..real import available, unavailable_reason

    if getattr(args, "recorded", None):
        from ..lab.compare import load_recorded_programs
        from ..lab.record import load_results
        programs = load_recorded_programs(args.paths, load_results(args.recorded))
    else:
        programs = load_programs(args.paths)
    if args.k:
        programs = [p for p in programs if any(k in p.name for k in args.k)]
    if not programs:
        raise ScenarioError("no program matched")
    if getattr(args, "recorded", None):
        return _cmd_recorded(args, programs)
    use_real = not args.model_only
    if use_real and not available():
        print(f"real-diff: /dev/kvm unavailable ({unavailable_reason()}); running the model only", file=sys.stderr)
        use_real = False
    prog = Progress("real-diff", getattr(args, "quiet", False), total=len(programs), unit="program")
    reports = []
    for i, p in enumerate(programs):
        reports.append(diff_program(p, args.profile, use_real, args.repeats))
        prog((i + 1) / len(programs))
    prog.done()
    emit(args, (report_json(reports) if args.json else format_report(reports, args.verbose)) + "\n")
    return 1 if any(r.status in ("differ", "error") for r in reports) else 0


def _cmd_recorded(args: argparse.Namespace, programs: list[Program]) -> int:
    """``--recorded FILE``: the real side comes from a lab results file (kvmmu.lab), no /dev/kvm needed."""
    from ..lab.compare import diff_recorded
    from ..lab.record import load_results

    results = load_results(args.recorded)
    profile = args.profile if args.profile_given else results.get("profile") or args.profile
    reports = diff_recorded(programs, results, profile)
    print(report_json(reports) if args.json else format_report(reports, args.verbose))
    return 1 if any(r.status in ("differ", "error") for r in reports) else 0


class _ProfileAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        namespace.profile, namespace.profile_given = values, True


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``real-diff`` on the kvmmu command line."""
    from ..cliargs import integer
    p = subparsers.add_parser("real-diff", help="run guest programs on the model and on /dev/kvm and compare",
                              description=DESCRIPTION)
    p.add_argument("paths", nargs="+", help="corpus folders or program files")
    p.add_argument("-k", action="append", default=[], help="only programs whose name contains this (repeatable)")
    p.add_argument("--profile", default="kvm-pvm", action=_ProfileAction,
                   help="model host profile (kvm-pvm, vmx-ept, vmx-shadow, svm-npt-tdp, svm-npt-legacy, svm-shadow)")
    p.add_argument("--recorded", metavar="FILE",
                   help="compare with real observations recorded by `kvmmu lab` (tests/realdiff/lab/*.json) "
                        "instead of running /dev/kvm; the profile defaults to the file's")
    p.set_defaults(profile_given=False)
    p.add_argument("--model-only", action="store_true", help="do not touch /dev/kvm")
    p.add_argument("--repeats", type=integer(1, 100, "a number of real runs"), default=5,
                   help="real runs of a program at most (1-100), while its exits exceed the model's (host noise)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true", help="details for every program")
    p.set_defaults(func=_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmmu.realdiff PATH...`` — the same as ``kvmmu real-diff PATH...``."""
    from ..cli import main as cli_main
    return cli_main(["real-diff", *(sys.argv[1:] if argv is None else argv)])
