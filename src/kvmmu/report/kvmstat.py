"""`kvmmu stat` (kvm_stat's view) and `kvmmu kvm-stat-report` (perf kvm stat report's table).

kvm_stat shows, per event, the total since start, its share of all events and the rate over the
last interval.  The events are KVM's binary-stats counters under their debugfs names (summed over a
VM's vCPUs, VM-wide ones included) and the `kvm_exit(REASON)` tracepoint counts, as kvm_stat shows
both.  Rates are per *modelled* second.  Modes as kvm_stat's: a live display (a terminal),
`-1` (one batch report: total and the rate over the whole run), `-l` (one line per interval);
`-f REGEX` keeps matching events, `-g NAME` one VM.

perf kvm stat report groups VM exits by reason: samples, their share, the share of time spent in
KVM, and min / max / average time per exit.  The time of an exit here is what the cost model
charges from `kvm_exit` to the next `kvm_entry` of that vCPU, in modelled microseconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ScenarioError
from ..kvm.tracepoints import exit_reason_name


def exit_label(fields: dict[str, Any]) -> str:
    return exit_reason_name(fields["exit_reason"], fields["isa"])


@dataclass
class StatRun:
    """Samples of every event's running total, per VM, at each interval of modelled time."""
    scenario: str
    vm_names: list[str]
    interval_s: float
    times: list[float] = field(default_factory=list)
    samples: list[list[dict[str, int]]] = field(default_factory=list)   # [sample][vm] -> event -> total


def _vm_totals(m: Any, exits: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in m.vm.vcpus:
        for k, n in v.stats.items():
            out[k] = out.get(k, 0) + n
    for k, n in m.vm.stats.items():
        out[k] = out.get(k, 0) + n
    for reason, n in exits.items():
        out[f"kvm_exit({reason})"] = n
    out["kvm_exit"] = sum(exits.values())
    return out


def collect_stats(sc: Any, interval_s: float, progress: Callable[[float], None] | None = None,
                  on_sample: Callable[[StatRun], None] | None = None) -> StatRun:
    """Run the scenario, sampling every VM's events every `interval_s` modelled seconds (and at the end).

    Sampling is passive: the totals are read when the first event past each boundary is traced, so
    watching a run never changes it (a VMM timer would perturb the scheduling)."""
    if not interval_s > 0 or interval_s == float("inf"):
        raise ScenarioError(f"--interval {interval_s}: a sampling interval is a positive number of seconds")
    run = StatRun(sc.name, [v.spec.name for v in sc.vms], interval_s)
    exit_counts: list[dict[str, int]] = []
    built: list[Any] = []
    next_t = [interval_s]

    def sample(t_s: float) -> None:
        run.times.append(t_s)
        run.samples.append([_vm_totals(m, exit_counts[i]) for i, m in enumerate(built)])
        if on_sample is not None:
            on_sample(run)

    def attach(machines: list[Any], oses: list[Any]) -> None:
        built.extend(machines)
        for m, o in zip(machines, oses, strict=True):
            counts: dict[str, int] = {}
            exit_counts.append(counts)
            ghz, cpus = o.p.ghz * 1e9, o.cpus

            def sub(ev: Any, counts: dict[str, int] = counts, ghz: float = ghz, cpus: Any = cpus) -> None:
                cpu = cpus[ev.vcpu if 0 <= ev.vcpu < len(cpus) else 0]
                while cpu.clock / ghz >= next_t[0]:
                    sample(next_t[0])
                    next_t[0] += interval_s
                if ev.name == "kvm_exit":
                    label = exit_label(ev.fields)
                    counts[label] = counts.get(label, 0) + 1
            m.vm.trace.subscribe(sub)
            m.vm.trace.enable(capacity=1)
    res = sc.run(progress=progress, on_built=attach)
    # The run's end: a boundary sample taken at the same modelled time is replaced by the final totals.
    if run.times and run.times[-1] >= res.modelled_s:
        run.times.pop()
        run.samples.pop()
    sample(res.modelled_s)
    return run


def _events(run: StatRun, vm: str | None, fields_re: str | None) -> tuple[list[str], list[dict[str, int]]]:
    """The per-sample totals of the chosen VM (or all VMs summed), and the event names to show."""
    if vm is not None and vm not in run.vm_names:
        raise ScenarioError(f"-g {vm!r}: no such VM; the VMs are {', '.join(run.vm_names)}")
    try:
        pattern = re.compile(fields_re) if fields_re else None
    except re.error as e:
        raise ScenarioError(f"-f {fields_re!r}: not a regular expression ({e})") from None
    picks = [run.vm_names.index(vm)] if vm is not None else range(len(run.vm_names))
    series: list[dict[str, int]] = []
    for per_vm in run.samples:
        tot: dict[str, int] = {}
        for i in picks:
            for k, n in per_vm[i].items():
                tot[k] = tot.get(k, 0) + n
        series.append(tot)
    names = sorted({k for s in series for k in s})
    if pattern is not None:
        names = [n for n in names if pattern.search(n)]
        if not names:
            raise ScenarioError(f"-f {fields_re!r}: matches no event")
    return names, series


def _share_base(names: list[str], last: dict[str, int]) -> int:
    # %Total is over the events shown, as in kvm_stat (the parent kvm_exit is not added to its children).
    return sum(last.get(n, 0) for n in names if not n.startswith("kvm_exit(")) or 1


def render_table(run: StatRun, vm: str | None = None, fields_re: str | None = None) -> str:
    """kvm_stat's display: Event, Total, %Total, CurAvg/s (the last interval), busiest first."""
    names, series = _events(run, vm, fields_re)
    last = series[-1]
    prev = series[-2] if len(series) > 1 else {}
    dt = run.times[-1] - (run.times[-2] if len(run.times) > 1 else 0.0)
    base = _share_base(names, last)
    rows = sorted((n for n in names if last.get(n, 0)), key=lambda n: (-last[n], n))
    title = (f"kvm statistics - {'summary' if vm is None else vm}  "
             f"(scenario {run.scenario}, {run.times[-1]:.6f} s modelled)")
    out = [title, "", f" {'Event':<42}{'Total':>12}{'%Total':>8}{'CurAvg/s':>12}"]
    for n in rows:
        cur = (last[n] - prev.get(n, 0)) / dt if dt > 0 else 0.0
        out.append(f" {n:<42}{last[n]:>12}{100.0 * last[n] / base:>8.1f}{cur:>12.0f}")
    out.append(f" {'Total':<42}{sum(last.get(n, 0) for n in names if not n.startswith('kvm_exit(')):>12}")
    return "\n".join(out) + "\n"


def render_batch(run: StatRun, vm: str | None = None, fields_re: str | None = None) -> str:
    """kvm_stat -1: one line per event, its total and its rate over the whole run (per modelled second)."""
    names, series = _events(run, vm, fields_re)
    last, t = series[-1], run.times[-1] or 1.0
    return "".join(f"{n:<42}{last.get(n, 0):>10}{last.get(n, 0) / t:>12.0f}\n" for n in names)


def render_log(run: StatRun, vm: str | None = None, fields_re: str | None = None) -> str:
    """kvm_stat -l: a header of event names, then one line of per-interval deltas per sample."""
    names, series = _events(run, vm, fields_re)
    names = [n for n in names if series[-1].get(n, 0)]
    width = max([10] + [len(n) + 1 for n in names])
    out = [f"{'time':>10}" + "".join(f"{n:>{width}}" for n in names)]
    prev: dict[str, int] = {}
    for t, s in zip(run.times, series, strict=True):
        out.append(f"{t:>10.4f}" + "".join(f"{s.get(n, 0) - prev.get(n, 0):>{width}}" for n in names))
        prev = s
    return "\n".join(out) + "\n"


def render_perf_kvm_stat(exits: list[tuple[int, int, str, float]], vm_names: list[str],
                         vm: str | None = None) -> str:
    """perf kvm stat report: VM-EXIT, Samples, Samples%, Time%, Min Time, Max Time, Avg time (µs)."""
    if vm is not None and vm not in vm_names:
        raise ScenarioError(f"--vm {vm!r}: no such VM; the VMs are {', '.join(vm_names)}")
    pick = None if vm is None else vm_names.index(vm)
    by: dict[str, list[float]] = {}
    for i, _vc, label, dt in exits:
        if pick is None or i == pick:
            by.setdefault(label, []).append(dt)
    n_all = sum(len(v) for v in by.values()) or 1
    t_all = sum(sum(v) for v in by.values()) or 1.0
    who = "all VMs" if vm is None else vm
    out = [f"Analyze events for {who}, all VCPUs (modelled time, from the cost model):", "",
           f"{'VM-EXIT':>20}{'Samples':>10}{'Samples%':>10}{'Time%':>10}{'Min Time':>13}{'Max Time':>13}"
           f"{'Avg time':>17}", ""]
    for label, ts in sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        avg = sum(ts) / len(ts)
        var = sum((x - avg) ** 2 for x in ts) / len(ts)
        rel = 100.0 * (var ** 0.5) / avg / (len(ts) ** 0.5) if avg > 0 else 0.0
        out.append(f"{label:>20}{len(ts):>10}{100.0 * len(ts) / n_all:>9.2f}%{100.0 * sum(ts) / t_all:>9.2f}%"
                   f"{min(ts) * 1e6:>11.2f}us{max(ts) * 1e6:>11.2f}us{avg * 1e6:>10.2f}us ( +-{rel:>6.2f}% )")
    out += ["", f"Total Samples:{n_all}, Total events handled time:{t_all * 1e6:.2f}us."]
    return "\n".join(out) + "\n"
