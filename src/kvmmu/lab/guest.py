"""The lab job that runs inside L1: ``python -m kvmmu.lab.guest SPEC.json``.

It reads back KVM's module parameters from /sys/module, then runs every program of the corpus on
L1's /dev/kvm with the project's own real backend (`kvmmu.realdiff.run_real`), with the
kvm/kvmmmu tracepoints on, and writes the results file (`kvmmu.lab.record`).

A program is run up to ``repeats`` times and the run with the fewest exits kept: L1's own timer
interrupts while L2 runs add exits and nothing else (the other observables of each run are compared,
and a run that differs elsewhere is reported in ``notes``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from .record import FORMAT, dump_results, observation_to_json
from .trace import Tracefs, summarize


def module_parameters() -> dict[str, str]:
    out: dict[str, str] = {}
    for mod in ("kvm", "kvm_amd"):
        base = Path("/sys/module") / mod / "parameters"
        for p in sorted(base.glob("*")) if base.is_dir() else []:
            try:
                out[f"{mod}.{p.name}"] = p.read_text().strip()
            except OSError:
                continue
    return out


def _guest_paging() -> dict[str, Any]:
    """What a default RealVM gives its guest here (from KVM_GET_SUPPORTED_CPUID): the host profile's
    guest_maxphyaddr / guest_gbpages must match it."""
    from ..real.cpuid import host_guest_paging
    width, gb, source = host_guest_paging()
    return {"maxphyaddr": width, "gbpages": gb, "source": source}


def _comparable(o: Any) -> tuple[Any, ...]:
    return (o.stops, o.mmio, o.memory, o.faults, o.fault_count, o.regs,
            {k: v for k, v in o.counters.items() if k != "exits"})


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    from ..guest.runtime import build
    from ..realdiff import load_programs, run_real

    programs = load_programs(spec["paths"])
    if spec.get("k"):
        programs = [p for p in programs if any(k in p.name for k in spec["k"])]
    repeats = max(1, int(spec.get("repeats", 3)))
    timeout = float(spec.get("timeout", 120.0))
    tracer: Tracefs | None
    try:
        tracer = enabled = Tracefs()
        enabled.enable()
    except OSError as e:
        print(f"lab: no tracepoints ({e})", file=sys.stderr)
        tracer = None
    out: dict[str, Any] = {
        "format": FORMAT, "config": spec.get("config"), "mmio_caching": spec.get("mmio_caching"),
        "profile": spec.get("profile"), "kernel": {"release": platform.release(), "version": platform.version()},
        "parameters": module_parameters(), "cpu": spec.get("cpu"), "guest_paging": _guest_paging(),
        "source": spec.get("source"),
        "paths": spec["paths"], "repeats": repeats, "captured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "programs": {},
    }
    t0 = time.monotonic()
    for i, program in enumerate(programs):
        image = build(program)
        best = None
        best_trace: list[Any] = []
        seen: list[int] = []
        notes: list[str] = []
        # A program with a long host-side loop (2^18 memslot updates) is run once: its exits are
        # dominated by nothing the timer could add, and one run costs minutes under TCG.
        tries = 1 if sum(len(a) for a in program.between) > 1000 else repeats
        for attempt in range(tries):
            if tracer is not None:
                tracer.clear()
            try:
                obs = run_real(program, image, timeout=timeout)
            except Exception as e:   # a broken program must not lose the others' results
                notes.append(f"attempt {attempt + 1}: {type(e).__name__}: {e}")
                break
            lines = tracer.take() if tracer is not None else []
            seen.append(obs.counters.get("exits", 0))
            if best is not None and _comparable(best) != _comparable(obs):
                notes.append(f"attempt {attempt + 1} differs beyond exits from attempt 1")
            if best is None or obs.counters.get("exits", 0) < best.counters.get("exits", 0):
                best, best_trace = obs, lines
            if len(seen) >= 2 and seen[-1] == seen[-2]:
                break
        entry: dict[str, Any] = {"exits_seen": seen, "lab_notes": notes}
        if best is not None:
            entry.update(observation_to_json(best))
            entry["trace"] = summarize(best_trace)
        out["programs"][program.name] = entry
        print(f"lab: [{i + 1}/{len(programs)}] {program.name} exits {seen} "
              f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    if tracer is not None:
        tracer.disable()
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kvmmu.lab.guest SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    results = run_spec(spec)
    tmp = Path(spec["out"] + ".part")
    dump_results(results, tmp)
    os.replace(tmp, spec["out"])
    print(f"lab: wrote {spec['out']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
