"""`kvmmu trace`: KVM's events as trace-cmd's `report` prints them.

    CPU 0/KVM-4001  [000]     0.001234: kvm_page_fault:       addr=0xffffc90000001000 error_code=0xb

The task is the vCPU thread (`CPU n/KVM`, with a made-up thread id per VM), the bracket the vCPU,
the time the modelled host time in seconds when the event happened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ScenarioError


def format_event(vm_name: str, vm_index: int, vcpu: int, t_s: float, name: str, fields: dict[str, Any]) -> str:
    args = " ".join(f"{k}={v:#x}" if isinstance(v, int) and not isinstance(v, bool) else f"{k}={v}"
                    for k, v in fields.items())
    task = f"CPU {vcpu}/KVM-{4000 + 100 * vm_index + vcpu}"
    return f"{task:>16}  [{vcpu:03d}] {t_s:12.6f}: {name + ':':<28} {args}   ({vm_name})"


def trace_scenario(sc: Any, events: list[str] | None = None, limit: int = 2000,
                   progress: Callable[[float], None] | None = None) -> str:
    if limit < 1:
        raise ScenarioError(f"--max-events {limit}: must be at least 1")
    lines: list[str] = []
    counts: dict[str, int] = {}
    keep = set(events) if events else None

    def attach(machines: list[Any], oses: list[Any]) -> None:
        for i, (m, o) in enumerate(zip(machines, oses, strict=True)):
            ghz = o.p.ghz * 1e9

            def sub(ev: Any, m: Any = m, o: Any = o, i: int = i, ghz: float = ghz) -> None:
                counts[ev.name] = counts.get(ev.name, 0) + 1
                if keep is not None and ev.name not in keep:
                    return
                if len(lines) >= limit:
                    return
                cpu = o.cpus[ev.vcpu] if 0 <= ev.vcpu < len(o.cpus) else None
                t = (cpu.clock if cpu is not None else 0) / ghz
                lines.append(format_event(m.spec.name, i, max(ev.vcpu, 0), t, ev.name, ev.fields))
            m.vm.trace.subscribe(sub)
            m.vm.trace.events.clear()
            m.vm.trace.enable(capacity=1)
    res = sc.run(progress=progress, on_built=attach)
    head = [f"# tracer: kvmmu (modelled)   scenario {res.name!r} seed {res.seed}, {res.modelled_s:.6f} s",
            f"# {sum(counts.values()):,} events, {len(lines):,} shown"
            + (f" (filter: {', '.join(sorted(keep))})" if keep else ""),
            "#", "#           TASK   CPU    TIMESTAMP  EVENT"]
    summary = ["", "# events by name:"] + [f"#   {n:<32} {c:>10,}" for n, c in sorted(counts.items(),
                                                                                   key=lambda x: -x[1])]
    return "\n".join(head + lines + summary) + "\n"
