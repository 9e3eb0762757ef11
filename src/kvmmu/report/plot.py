"""PNG charts with matplotlib (the optional extra `plot`): counters over modelled time, and bars per
MMU flavour / MMIO policy.  Without matplotlib, `require_matplotlib` raises a one-line error."""

from __future__ import annotations

from typing import Any

from ..errors import KvmmuError


class PlotUnavailable(KvmmuError):
    """matplotlib is not installed."""


def require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("plotting needs matplotlib, which is not installed: pip install 'kvmmu[plot]' "
                              "(every other command works without it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt: Any, fig: Any, path: str) -> None:
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as exc:
        raise KvmmuError(f"--output {path!r}: cannot write the chart ({exc})") from None
    finally:
        plt.close(fig)


def check_output(path: str) -> None:
    """Refuse an output path matplotlib cannot write, before any work is done."""
    from pathlib import Path
    p = Path(path)
    if p.is_dir():
        raise KvmmuError(f"--plot {path!r}: is a directory; name the picture file (e.g. walk.png)")
    if not p.parent.is_dir():
        raise KvmmuError(f"--plot {path!r}: the directory {str(p.parent)!r} does not exist")
    if p.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise KvmmuError(f"--plot {path!r}: the picture is a .png, .svg or .pdf file")


def plot_walk(path: str, title: str, guest: list[str], before: list[str], after: list[str], events: list[str],
              path_taken: str) -> None:
    """One access's way, as boxes joined by arrows: the guest's walk (CR3 down to the gpa), KVM's
    tables before and after the access, and KVM's events in order (`explain --plot`)."""
    plt = require_matplotlib()
    cols = [("the guest's page walk", guest, "#dbe9f6"), ("KVM's tables before", before, "#eeeeee"),
            ("KVM's events", events[:24] + ([f"... {len(events) - 24} more"] if len(events) > 24 else []), "#fdebd3"),
            ("KVM's tables after", after, "#dff2df")]
    rows = max(len(c[1]) for c in cols) or 1
    fig, ax = plt.subplots(figsize=(18, 1.2 + 0.55 * rows))
    ax.set_axis_off()
    ax.set_xlim(0, 4)
    ax.set_ylim(-rows - 0.5, 1)
    for x, (head, items, colour) in enumerate(cols):
        ax.text(x + 0.5, 0.45, head, ha="center", va="center", fontsize=10, weight="bold")
        for y, text in enumerate(items):
            ax.text(x + 0.5, -y - 0.2, text if len(text) <= 70 else text[:67] + "...", ha="center", va="center",
                    fontsize=6.5, family="monospace", bbox={"boxstyle": "round", "fc": colour, "ec": "#888888"})
            if y:
                ax.annotate("", xy=(x + 0.5, -y + 0.05), xytext=(x + 0.5, -y + 0.55),
                            arrowprops={"arrowstyle": "->", "color": "#555555"})
    ax.set_title(f"{title}\n{path_taken}", fontsize=9)
    fig.tight_layout()
    _save(plt, fig, path)


def _log_wanted(values: list[float], log: bool | None) -> bool:
    """A log scale when asked, or (by default) when the positive values span two orders of magnitude."""
    if log is not None:
        return log
    pos = [v for v in values if v > 0]
    return bool(pos) and max(pos) / min(pos) >= 100


def interval_rates(series: list[dict[str, Any]], metric: str) -> tuple[list[float], list[float]]:
    """Per-interval rates (events per modelled second) from cumulative samples: one point per
    interval, at its end."""
    ts, out, prev_t, prev = [], [], 0.0, 0
    for s in series:
        dt = s["t_s"] - prev_t
        if dt > 0:
            ts.append(s["t_s"])
            out.append((s[metric] - prev) / dt)
        prev_t, prev = s["t_s"], s[metric]
    return ts, out


def plot_series(res: Any, path: str, metrics: list[str], cumulative: bool = False, log: bool | None = None) -> None:
    """Counters over modelled time (the scenario's `sample_ms`): per-interval rates by default, the
    running totals with `cumulative`; a log scale when the values span orders of magnitude."""
    plt = require_matplotlib()
    if not res.series:
        raise KvmmuError("no samples were taken: set sample_ms in the scenario or run longer")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    every: list[float] = []
    for m in metrics:
        if m not in res.series[0]:
            known = ", ".join(k for k in res.series[0] if k != "t_s")
            raise KvmmuError(f"--metrics {m!r}: not sampled (sampled: {known})")
        if cumulative:
            ts, ys = [s["t_s"] for s in res.series], [float(s[m]) for s in res.series]
        else:
            ts, ys = interval_rates(res.series, m)
        every += ys
        ax.plot(ts, ys, label=m, marker="." if len(ts) < 40 else None)
    if _log_wanted(every, log):
        ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("modelled host time (s)")
    ax.set_ylabel("cumulative count" if cumulative else "events per modelled second (per interval)")
    ax.set_title(f"{res.name}: " + ", ".join(f"{v.name} {v.mmu}/{v.mmio_caching}" for v in res.vms)[:90])
    ax.legend()
    fig.tight_layout()
    _save(plt, fig, path)


def miss_rates(series: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """The share (%) of each interval's MMIO accesses that missed the fast path (intervals with none
    are left out)."""
    ts, out, prev_a, prev_m = [], [], 0, 0
    for s in series:
        a, m = s["mmio_accesses"] - prev_a, s["mmio_slow_path"] - prev_m
        if a > 0:
            ts.append(s["t_s"])
            out.append(100.0 * m / a)
        prev_a, prev_m = s["mmio_accesses"], s["mmio_slow_path"]
    return ts, out


def plot_missrate(results: list[tuple[str, Any]], path: str, log: bool | None = None) -> None:
    """The MMIO miss rate per interval over modelled time, one line per flavour / policy."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    every: list[float] = []
    for label, r in results:
        if not r.series:
            raise KvmmuError("no samples were taken: set sample_ms in the scenario or run longer")
        ts, ys = miss_rates(r.series)
        every += ys
        ax.plot(ts, ys, label=label, marker="." if len(ts) < 40 else None)
    if _log_wanted(every, log):
        ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("modelled host time (s)")
    ax.set_ylabel("MMIO accesses that missed the fast path (%)")
    ax.set_title(f"{results[0][1].name}: MMIO miss rate per interval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(plt, fig, path)


def plot_compare(results: list[tuple[str, Any]], path: str, metrics: list[str], log: bool | None = None) -> None:
    """Grouped bars: one group per metric, one bar per flavour/policy (log scale when the bars span
    orders of magnitude)."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    n = len(results)
    width = 0.8 / max(1, n)
    every: list[float] = []
    for i, (label, r) in enumerate(results):
        vals = []
        for m in metrics:
            try:
                vals.append(r.total(m))
            except KeyError:
                raise KvmmuError(f"--metrics {m!r}: no such counter") from None
        ax.bar([j + i * width for j in range(len(metrics))], vals, width, label=label)
        every += [float(v) for v in vals]
    ax.set_xticks([j + width * (n - 1) / 2 for j in range(len(metrics))], metrics, rotation=15)
    if _log_wanted(every, log):
        ax.set_yscale("symlog", linthresh=1)
    ax.set_ylabel("count")
    ax.set_title(f"{results[0][1].name}: MMU flavours x MMIO policies")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(plt, fig, path)
