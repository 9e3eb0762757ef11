"""The real-diff report: a table per program and observable, details for the programs that differ,
or JSON."""

from __future__ import annotations

import json
from typing import Any

from .compare import ProgramReport
from .observation import COUNTERS, OBSERVABLES, Observation


def format_report(reports: list[ProgramReport], verbose: bool = False) -> str:
    lines: list[str] = []
    width = max((len(r.name) for r in reports), default=10)
    header = f"{'program':<{width}}  {'status':<10}  " + "  ".join(f"{o:<8}" for o in OBSERVABLES)
    lines.append(header)
    lines.append("-" * len(header))
    for r in reports:
        cells = []
        for o in OBSERVABLES:
            d = next((x for x in r.diffs if x.name == o), None)
            cells.append(f"{'-' if d is None else 'equal' if d.equal else 'DOC' if d.documented else 'DIFF':<8}")
        lines.append(f"{r.name:<{width}}  {r.status:<10}  " + "  ".join(cells))
    counts: dict[str, int] = {}
    for r in reports:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines.append("")
    lines.append("summary: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    for r in reports:
        if r.status in ("agree", "model-only") and not verbose:
            continue
        lines.append("")
        lines.append(f"== {r.name} ({r.status}) ==")
        if r.program.doc:
            lines.append(f"  {r.program.doc}")
        if r.model.error:
            lines.append(f"  model error: {r.model.error}")
        if r.real is not None:
            lines.extend(f"  note: {n}" for n in r.real.notes)
        lines.extend(f"  uses an SDM-undefined value (results after it are the model's guess): {u}"
                     for u in r.model.undefined_uses)
        for d in r.diffs:
            if d.equal:
                continue
            tag = f" [documented: {d.documented}]" if d.documented else ""
            lines.append(f" {d.name}: different{tag}")
            lines.extend(d.lines)
        if verbose:
            lines.append("  counters        " + "  ".join(f"{n}={r.model.counters[n]}" for n in COUNTERS))
            if r.real is not None:
                lines.append("  real counters   " + "  ".join(f"{n}={r.real.counters[n]}" for n in COUNTERS))
            lines.append("  model extra     " + "  ".join(f"{n}={v}" for n, v in r.model.extra.items()))
            if r.real is not None:
                lines.append("  real extra      " + "  ".join(f"{n}={v}" for n, v in r.real.extra.items()))
    return "\n".join(lines)


def report_json(reports: list[ProgramReport]) -> str:
    def obs(o: Observation | None) -> dict[str, Any] | None:
        if o is None:
            return None
        return {"backend": o.backend, "stops": o.stops, "counters": o.counters, "extra": o.extra,
                "mmio": [str(m) for m in o.mmio], "faults": [str(f) for f in o.faults],
                "fault_count": o.fault_count, "pages": len(o.memory), "error": o.error, "notes": o.notes,
                "undefined_uses": o.undefined_uses,
                "regs": {k: hex(v) for k, v in o.regs.items()}}
    return json.dumps([{"program": r.name, "cpl": r.program.cpl, "status": r.status,
                        "diffs": {d.name: {"equal": d.equal, "documented": d.documented, "lines": d.lines}
                                  for d in r.diffs},
                        "model": obs(r.model), "real": obs(r.real)} for r in reports], indent=1)
