"""The `kvmmu` command line.  Errors a user can cause print one line and exit with status 2."""

from __future__ import annotations

import argparse
import sys

from .errors import KvmmuError


def _cmd_demo(args: argparse.Namespace) -> int:
    from .report.demo import run_demo

    run_demo(sys.stdout, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmmu", description="An executable model of the KVM x86 MMU.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the headline experiment on the built-in default VM")
    d.add_argument("--seed", type=int, default=1)
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KvmmuError as exc:
        print(f"kvmmu: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
