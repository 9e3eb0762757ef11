"""`kvmmu trace`: KVM's events of a scenario run, as `trace-cmd report` prints them.

    CPU 0/KVM-4000  [000]     0.000123: kvm_exit:             vcpu 0 reason EPT_VIOLATION rip 0x0 ...

The task is the vCPU thread (`CPU n/KVM`, a made-up thread id per VM), the bracket the vCPU, the
timestamp the modelled host time in seconds.  Within one guest access the time advances by what the
cost model charges for KVM's work so far, so events are strictly ordered in time; lines of every
vCPU and VM are merged by timestamp.  The fields follow the kernel's TP_printk formats
(`kvm.tracepoints`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ScenarioError
from ..kvm.tracepoints import format_event, select_events, subsystem


@dataclass(frozen=True)
class Record:
    t_s: float
    seq: int
    vm: int
    vcpu: int
    name: str
    fields: dict[str, Any]


@dataclass
class Capture:
    """What one traced run recorded: the selected events, every event's count, the VMs' names."""
    scenario: str
    seed: int
    modelled_s: float
    vm_names: list[str]
    records: list[Record] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    selected: frozenset[str] = frozenset()
    # perf kvm stat: (vm, vcpu, exit reason, modelled seconds from kvm_exit to kvm_entry)
    exit_times: list[tuple[int, int, str, float]] = field(default_factory=list)

    def sorted(self) -> list[Record]:
        return sorted(self.records, key=lambda r: (r.t_s, r.seq))


def task(vm: int, vcpu: int) -> tuple[str, int]:
    return f"CPU {vcpu}/KVM", 4000 + 100 * vm + vcpu


def report_line(r: Record) -> str:
    comm, pid = task(r.vm, r.vcpu)
    head = f"{comm + '-' + str(pid):>16} [{r.vcpu:03d}] {r.t_s:12.6f}: {r.name + ':':<21} "
    return head + format_event(r.name, r.fields)


def capture_scenario(sc: Any, events: list[str] | None = None,
                     progress: Callable[[float], None] | None = None) -> Capture:
    """Run the scenario with tracing on; keep the selected events (default: every kvm and kvmmmu
    event), count all of them, and time each exit for `perf kvm stat`."""
    from .kvmstat import exit_label
    selected = select_events(events)
    cap = Capture(sc.name, sc.seed, 0.0, [v.spec.name for v in sc.vms], selected=selected)
    counts = cap.counts

    def attach(machines: list[Any], oses: list[Any]) -> None:
        for i, (m, o) in enumerate(zip(machines, oses, strict=True)):
            ghz = o.p.ghz * 1e9
            vcpus, cpus, cost = m.vm.vcpus, o.cpus, o._vcpu_cost
            open_exit: dict[int, tuple[str, float]] = {}

            def sub(ev: Any, i: int = i, ghz: float = ghz, vcpus: Any = vcpus, cpus: Any = cpus,
                    cost: Any = cost, open_exit: dict[int, tuple[str, float]] = open_exit) -> None:
                name = ev.name
                counts[name] = counts.get(name, 0) + 1
                vc = ev.vcpu if 0 <= ev.vcpu < len(cpus) else 0
                cpu = cpus[vc]
                t = (cpu.clock + cost(vcpus[vc]) - cpu.last_cost) / ghz
                if name == "kvm_exit":
                    open_exit[vc] = (exit_label(ev.fields), t)
                elif name == "kvm_entry" and vc in open_exit:
                    label, t0 = open_exit.pop(vc)
                    cap.exit_times.append((i, vc, label, t - t0))
                if name in selected:
                    cap.records.append(Record(t, ev.seq, i, vc, name, ev.fields))
            m.vm.trace.subscribe(sub)
            m.vm.trace.events.clear()
            m.vm.trace.enable(capacity=1)
    res = sc.run(progress=progress, on_built=attach)
    cap.modelled_s = res.modelled_s
    return cap


def render_report(cap: Capture, head: int | None = None) -> str:
    """trace-cmd report: a header, the merged lines (the first `head` of them), a summary by event."""
    if head is not None and (type(head) is not int or head < 1):
        raise ScenarioError(f"--head {head}: must be at least 1")
    records = cap.sorted()
    shown = records if head is None else records[:head]
    total = sum(cap.counts.values())
    out = [f"# tracer: kvmmu (modelled), scenario {cap.scenario!r} seed {cap.seed}, {cap.modelled_s:.6f} s, "
           f"VMs: {', '.join(f'{n} (KVM-{4000 + 100 * i})' for i, n in enumerate(cap.vm_names))}",
           f"# {total:,} events, {len(records):,} selected, {len(shown):,} shown",
           "#"]
    out += [report_line(r) for r in shown]
    out += ["", "# events by name:"]
    out += [f"#   {subsystem(n) + ':' + n:<40} {c:>10,}" for n, c in sorted(cap.counts.items(), key=lambda x: -x[1])]
    return "\n".join(out) + "\n"
