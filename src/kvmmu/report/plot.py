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


def plot_series(res: Any, path: str, metrics: list[str]) -> None:
    """Cumulative counters sampled over modelled time (the scenario's `sample_ms`)."""
    plt = require_matplotlib()
    if not res.series:
        raise KvmmuError("no samples were taken: set sample_ms in the scenario or run longer")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ts = [s["t_s"] for s in res.series]
    for m in metrics:
        if m not in res.series[0]:
            known = ", ".join(k for k in res.series[0] if k != "t_s")
            raise KvmmuError(f"--metrics {m!r}: not sampled (sampled: {known})")
        ax.plot(ts, [s[m] for s in res.series], label=m)
    ax.set_xlabel("modelled host time (s)")
    ax.set_ylabel("cumulative count")
    ax.set_title(f"{res.name}: " + ", ".join(f"{v.name} {v.mmu}/{v.mmio_caching}" for v in res.vms)[:90])
    ax.legend()
    fig.tight_layout()
    _save(plt, fig, path)


def plot_compare(results: list[tuple[str, Any]], path: str, metrics: list[str]) -> None:
    """Grouped bars: one group per metric, one bar per flavour/policy."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    n = len(results)
    width = 0.8 / max(1, n)
    for i, (label, r) in enumerate(results):
        vals = []
        for m in metrics:
            try:
                vals.append(r.total(m))
            except KeyError:
                raise KvmmuError(f"--metrics {m!r}: no such counter") from None
        ax.bar([j + i * width for j in range(len(metrics))], vals, width, label=label)
    ax.set_xticks([j + width * (n - 1) / 2 for j in range(len(metrics))], metrics, rotation=15)
    ax.set_ylabel("count")
    ax.set_title(f"{results[0][1].name}: MMU flavours x MMIO policies")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(plt, fig, path)
