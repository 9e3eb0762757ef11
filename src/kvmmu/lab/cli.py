"""``kvmmu lab``: a real KVM with MMIO caching on, nested in QEMU TCG (docs/real-kvm.md).

    kvmmu lab setup [--kernel-deb FILE.deb | --bzimage FILE --modules DIR]
    kvmmu lab status
    kvmmu lab real-diff CORPUS... --config npt|npt-legacy|shadow [--no-mmio-caching] [-k PATTERN] [--save FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .configs import CONFIGS, get_config

if TYPE_CHECKING:
    from ..guest.runtime import Program


def _setup(args: argparse.Namespace) -> int:
    from .setup import setup
    lab, log = setup(args.kernel_deb, args.bzimage, args.modules, install=not args.no_install)
    for line in log:
        print(line)
    print(f"lab ready: kernel {lab.release} ({lab.source})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from .setup import ready, status
    for line in status():
        print(line)
    why = ready()
    print("ready" if why is None else f"not ready: {why}")
    return 0 if why is None else 1


def _real_diff(args: argparse.Namespace) -> int:
    from ..realdiff import format_report, load_programs, report_json
    from .compare import diff_recorded, load_recorded_programs
    from .record import dump_results
    from .run import capture

    config = get_config(args.config)
    caching = not args.no_mmio_caching
    programs = load_programs(args.paths)     # refuse a bad corpus before booting anything
    if args.k:
        programs = [p for p in programs if any(k in p.name for k in args.k)]
    if not programs:
        from ..errors import ScenarioError
        raise ScenarioError("no program matched")
    print(f"lab: booting L1 ({config.summary}, mmio_caching={int(caching)}) for {len(programs)} programs",
          file=sys.stderr)
    results, run_dir = capture(config, caching, args.paths, args.k, repeats=args.repeats)
    print(f"lab: results in {run_dir / 'results.json'} ({results.get('seconds')} s in L1)", file=sys.stderr)
    if args.save:
        dump_results(results, args.save)
    chosen = {p.name for p in programs}                                # built for L1's guest width
    programs = [p for p in load_recorded_programs(args.paths, results) if p.name in chosen]
    reports = diff_recorded(programs, results, config.profile_name(caching))
    print(report_json(reports) if args.json else format_report(reports, args.verbose))
    return 1 if any(r.status in ("differ", "error") for r in reports) else 0


def real_diff_recorded(args: argparse.Namespace, programs: list[Program]) -> int:
    """``--recorded FILE``: the real side comes from a lab results file (kvmmu.lab), no /dev/kvm needed."""
    from ..realdiff import format_report, report_json
    from .compare import diff_recorded, load_recorded_programs
    from .record import load_results

    results = load_results(args.recorded)
    # The same programs, built for the guest width the recording measured (its L1's CPUID).
    chosen = {p.name for p in programs}
    programs = [p for p in load_recorded_programs(args.paths, results) if p.name in chosen]
    profile = args.profile if args.profile_given else results.get("profile") or args.profile
    reports = diff_recorded(programs, results, profile)
    print(report_json(reports) if args.json else format_report(reports, args.verbose))
    return 1 if any(r.status in ("differ", "error") for r in reports) else 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lab`` on the kvmmu command line."""
    p = subparsers.add_parser("lab", help="a real KVM with MMIO caching on, nested in QEMU TCG",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="lab_command", required=True)
    s = sub.add_parser("setup", help="install QEMU/busybox, fetch a kernel, build the initramfs (once)")
    s.add_argument("--kernel-deb", help="a Debian kernel image package to use instead of the stock one")
    s.add_argument("--bzimage", help="a locally built kernel (with --modules)")
    s.add_argument("--modules", help="its lib/modules/<release> directory (with --bzimage)")
    s.add_argument("--no-install", action="store_true", help="do not apt-get install anything")
    s.set_defaults(func=_setup)
    st = sub.add_parser("status", help="what is set up")
    st.set_defaults(func=_status)
    r = sub.add_parser("real-diff", help="run a corpus on real KVM in L1 and compare with the model")
    r.add_argument("paths", nargs="+", help="corpus folders or program files (not under /tmp)")
    r.add_argument("--config", required=True, choices=sorted(CONFIGS), help="KVM configuration in L1")
    r.add_argument("--no-mmio-caching", action="store_true", help="load kvm with mmio_caching=0")
    r.add_argument("-k", action="append", default=[], help="only programs whose name contains this (repeatable)")
    r.add_argument("--repeats", type=int, default=3, help="real runs per program at most (fewest exits kept)")
    r.add_argument("--save", type=Path, help="also write the recorded results here (for real-diff --recorded)")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.add_argument("-v", "--verbose", action="store_true", help="details for every program")
    r.set_defaults(func=_real_diff)
    return p


__all__ = ["add_cli", "real_diff_recorded"]
