"""A sweep's stored results merged into the table `compare` prints: a column per matrix point, a
row per metric, each cell the mean over the seeds with a 95 % confidence interval (Student's t)."""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import ScenarioError
from .spec import Cell

# Two-sided 95 % quantiles of Student's t by degrees of freedom (1..30); 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def default_metrics() -> list[str]:
    from ..report.render import COMPARE_ROWS
    return [name for _, name in COMPARE_ROWS] + ["mmio_fastpath_invalid", "overhead_cycles"]


def total(result: dict[str, Any], name: str) -> float:
    """ScenarioResult.total on the stored form: the metric summed over the VMs."""
    s = 0.0
    found = False
    for vm in result["vms"]:
        if name == "overhead_cycles":
            s += vm["overhead_cycles"]
            found = True
            continue
        for part in ("kvm_vcpu_stats", "model_counters", "kvm_vm_stats", "guest", "workload"):
            if name in vm[part]:
                v = vm[part][name]
                s += v if isinstance(v, (int, float)) else 0
                found = True
                break
    if not found:
        raise ScenarioError(f"metric {name!r}: no such counter in the results")
    return s


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95 % confidence interval (0 for a single seed)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    t = _T95[n - 2] if n - 2 < len(_T95) else 1.96
    return m, t * sd / math.sqrt(n)


def summarise(cells: list[Cell], results: dict[str, dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    points: dict[tuple, list[str]] = {}
    for c in cells:
        points.setdefault(c.point, []).append(c.key)
    out: dict[str, Any] = {"columns": [], "metrics": metrics}
    for point, keys in points.items():
        rs = [results[k] for k in keys if k in results]
        values: dict[str, dict[str, float]] = {}
        col = {"point": {p: v for p, v in point}, "seeds": len(rs), "values": values}
        for name in metrics:
            if rs:
                m, h = mean_ci([total(r, name) for r in rs])
                values[name] = {"mean": m, "ci95": h}
        out["columns"].append(col)
    return out


def render_summary(summary: dict[str, Any], title: str) -> str:
    from ..report.table import format_table

    def label(col: dict[str, Any]) -> str:
        return ", ".join(f"{str(v)}" for v in col["point"].values()) or "base"

    def cell(v: dict[str, float] | None) -> str:
        if v is None:
            return "(not run)"
        m, h = v["mean"], v["ci95"]
        fmt = (lambda x: f"{x:,.0f}") if abs(m) >= 100 or m == int(m) else (lambda x: f"{x:,.3f}")
        return fmt(m) + (f" ± {fmt(h)}" if h else "")
    cols = summary["columns"]
    header = ["", *[label(c) for c in cols]]
    rows = [[name, *[cell(c["values"].get(name)) for c in cols]] for name in summary["metrics"]]
    rows.append(["seeds", *[str(c["seeds"]) for c in cols]])
    axes = " x ".join(cols[0]["point"].keys()) if cols and cols[0]["point"] else "no matrix"
    return f"{title}: {axes}; mean ± 95 % confidence interval over the seeds\n\n" + format_table(header, rows) + "\n"


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, default=str)
