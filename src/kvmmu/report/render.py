"""Turning scenario results into tables, JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from ..scenario import ScenarioResult, VmResult
from .table import format_table

# (label, where, name): what `kvmmu run` and `kvmmu compare` show, in this order.
RUN_ROWS: list[tuple[str, str, str]] = [
    ("KVM vCPU stats", "", ""),
    ("exits", "stats", "exits"),
    ("pf_taken", "stats", "pf_taken"),
    ("pf_fixed", "stats", "pf_fixed"),
    ("pf_emulate", "stats", "pf_emulate"),
    ("pf_spurious", "stats", "pf_spurious"),
    ("pf_mmio_spte_created", "stats", "pf_mmio_spte_created"),
    ("pf_guest", "stats", "pf_guest"),
    ("mmio_exits", "stats", "mmio_exits"),
    ("insn_emulation", "stats", "insn_emulation"),
    ("tlb_flush", "stats", "tlb_flush"),
    ("invlpg", "stats", "invlpg"),
    ("KVM VM stats", "", ""),
    ("mmu_shadow_zapped", "vm", "mmu_shadow_zapped"),
    ("mmu_pte_write", "vm", "mmu_pte_write"),
    ("mmu_flooded", "vm", "mmu_flooded"),
    ("mmu_recycled", "vm", "mmu_recycled"),
    ("mmu_cache_miss", "vm", "mmu_cache_miss"),
    ("mmu_unsync (now)", "vm", "mmu_unsync"),
    ("pages_4k (now)", "vm", "pages_4k"),
    ("model counters (not in KVM)", "", ""),
    ("guest walks by KVM", "counters", "guest_walks"),
    ("guest PTE reads", "counters", "guest_pte_reads"),
    ("memslot lookups", "counters", "memslot_lookups"),
    ("memslot searches", "counters", "memslot_searches"),
    ("lockless shadow walks", "counters", "shadow_walks"),
    ("MMIO fast path (spte)", "counters", "mmio_fastpath"),
    ("MMIO fast path: stale generation", "counters", "mmio_fastpath_invalid"),
    ("MMIO cache hits", "counters", "mmio_cache_hits"),
    ("KVM_EXIT_MMIO records", "counters", "userspace_exits"),
    ("in-kernel device accesses", "counters", "iobus_handled"),
    ("host swap-ins", "counters", "host_swapins"),
    ("guest MMIO accesses", "", ""),
    ("MMIO accesses", "guest", "mmio_accesses"),
    ("  recognised by the fast path", "guest", "mmio_fast_path"),
    ("  missed the fast path (full fault path)", "guest", "mmio_slow_path"),
    ("  went to userspace", "guest", "mmio_to_userspace"),
    ("guest OS", "", ""),
    ("processes forked", "guest", "forks"),
    ("page faults (guest #PF handler)", "guest", "page_faults"),
    ("copy-on-write faults", "guest", "cow_faults"),
    ("context switches", "guest", "context_switches"),
    ("timer ticks", "guest", "ticks"),
    ("kernel PTE writes", "guest", "kernel_pte_writes"),
    ("disk requests", "guest", "disk_requests"),
    ("network requests", "guest", "net_requests"),
]


def _value(v: VmResult, where: str, name: str) -> Any:
    d = {"stats": v.stats, "counters": v.counters, "vm": v.vm_stats, "guest": v.guest}[where]
    return d.get(name, 0)


def run_table(res: ScenarioResult) -> str:
    cols = [v.name for v in res.vms]
    multi = len(cols) > 1
    header = ["", *cols, *(["total"] if multi else [])]
    rows: list[list[Any]] = []
    for label, where, name in RUN_ROWS:
        if not where:
            rows.append([f"-- {label}", *([""] * (len(header) - 1))])
            continue
        vals = [_value(v, where, name) for v in res.vms]
        rows.append([label, *vals, *([sum(vals)] if multi else [])])
    rows.append(["-- workload", *([""] * (len(header) - 1))])
    keys: list[str] = []
    for v in res.vms:
        keys += [k for k in v.workload if k not in keys]
    for k in keys:
        vals = [v.workload.get(k, "") for v in res.vms]
        tot = sum(x for x in vals if isinstance(x, (int, float))) if multi and all(
            isinstance(x, int) for x in vals) else ""
        rows.append([k, *vals, *([tot] if multi else [])])
    return format_table(header, rows)


def cost_table(res: ScenarioResult) -> str:
    cols = [v.name for v in res.vms]
    multi = len(cols) > 1
    header = ["modelled cost (cycles)", *[f"{c} events" for c in cols], *[f"{c} cycles" for c in cols],
              *(["total cycles"] if multi else [])]
    rows: list[list[Any]] = []
    cats = list(res.vms[0].cost) if res.vms else []
    for cat in cats:
        ev = [v.cost[cat][0] for v in res.vms]
        cy = [v.cost[cat][1] for v in res.vms]
        rows.append([cat, *ev, *cy, *([sum(cy)] if multi else [])])
    ov = [v.overhead_cycles for v in res.vms]
    nat = [v.native_cycles for v in res.vms]
    rows.append(["= virtualization overhead", *[""] * len(cols), *ov, *([sum(ov)] if multi else [])])
    rows.append(["guest native work", *[""] * len(cols), *nat, *([sum(nat)] if multi else [])])
    return format_table(header, rows)


def run_text(res: ScenarioResult) -> str:
    head = (f"scenario {res.name!r}  seed {res.seed}  modelled {res.modelled_s:.3f} s of host time "
            f"(asked {res.duration_s:g} s; stopped: {res.stopped_by})\n"
            f"VMs: " + ", ".join(f"{v.name} ({v.vcpus} vCPU, {v.mmu}/{v.mmio_caching})" for v in res.vms)
            + "\nKVM module parameters: " + "; ".join(f"{v.name}: {v.kvm_params.header()}" for v in res.vms))
    if res.host.get("memory_limit_mib"):
        head += (f"\nhost: {res.host['memory_limit_mib']} MiB limit, {res.host['swapouts']:,} pages swapped out, "
                 f"{res.host['swapins']:,} swapped back in")
    return f"{head}\n\n{run_table(res)}\n\n{cost_table(res)}\n"


def run_json(res: ScenarioResult) -> str:
    return json.dumps(res.to_dict(), indent=2, sort_keys=False)


def run_csv(res: ScenarioResult) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["vm", "section", "name", "value"])
    for v in res.vms:
        for section, d in (("kvm_vcpu_stats", v.stats), ("kvm_vm_stats", v.vm_stats), ("model_counters", v.counters),
                           ("guest", v.guest), ("workload", v.workload)):
            for k, x in d.items():
                w.writerow([v.name, section, k, x])
        for cat, (e, c) in v.cost.items():
            w.writerow([v.name, "cost_events", cat, e])
            w.writerow([v.name, "cost_cycles", cat, c])
        w.writerow([v.name, "cost_cycles", "guest native work", v.native_cycles])
    return out.getvalue()


# -- compare ---------------------------------------------------------------------------------------------
COMPARE_ROWS: list[tuple[str, str]] = [
    ("exits", "exits"), ("pf_taken", "pf_taken"), ("pf_emulate", "pf_emulate"),
    ("pf_mmio_spte_created", "pf_mmio_spte_created"), ("mmio_exits", "mmio_exits"),
    ("mmu_shadow_zapped", "mmu_shadow_zapped"),
    ("MMIO accesses", "mmio_accesses"), ("MMIO: fast path", "mmio_fast_path"),
    ("MMIO: missed the fast path", "mmio_slow_path"),
    ("guest walks by KVM", "guest_walks"), ("guest PTE reads", "guest_pte_reads"),
    ("memslot searches", "memslot_searches"), ("lockless shadow walks", "shadow_walks"),
    ("host swap-ins", "host_swapins"),
]


def compare_rows(results: list[tuple[str, ScenarioResult]]) -> tuple[list[str], list[list[Any]]]:
    """One table: a column per configuration, `value (x ratio to the first column)`."""
    header = ["", *[label for label, _ in results]]
    rows: list[list[Any]] = []

    def line(label: str, vals: list[float | int]) -> None:
        base = vals[0]
        cells: list[Any] = [label]
        for i, v in enumerate(vals):
            shown = f"{v:,.0f}" if isinstance(v, (int, float)) and abs(v) >= 100 or isinstance(v, int) else f"{v:,.2f}"
            if i == 0:
                cells.append(shown)
            elif base:
                cells.append(f"{shown} (x{v / base:.2f})")
            else:
                cells.append(f"{shown} (-)" if v else shown)
        rows.append(cells)
    for label, name in COMPARE_ROWS:
        line(label, [r.total(name) for _, r in results])
    # The signal of the MMIO policies: the share of MMIO accesses that missed the fast path, and how
    # many fast-path attempts found a stale generation (the price of not zapping on memslot changes).
    line("MMIO miss rate (%)", [_miss_rate(r) for _, r in results])
    line("fast path: stale generation", [r.total("mmio_fastpath_invalid") for _, r in results])
    wl_keys = [k for k, x in results[0][1].vms[0].workload.items() if isinstance(x, (int, float))]
    for k in wl_keys:
        line(f"workload: {k}", [sum(v.workload.get(k) or 0 for v in r.vms) for _, r in results])
    line("overhead cycles (modelled)", [sum(v.overhead_cycles for v in r.vms) for _, r in results])
    line("overhead cycles per MMIO access",
         [_per_mmio(r) for _, r in results])
    line("modelled seconds", [r.modelled_s for _, r in results])
    return header, rows


def _miss_rate(r: ScenarioResult) -> float:
    n = r.total("mmio_accesses")
    return 100.0 * r.total("mmio_slow_path") / n if n else 0.0


def _per_mmio(r: ScenarioResult) -> float:
    """Cycles of the MMIO-related categories per guest MMIO access."""
    n = r.total("mmio_accesses")
    if not n:
        return 0.0
    cats = ("guest page walks by KVM", "memslot lookups", "lockless shadow walks", "instruction emulation",
            "in-kernel devices", "userspace (KVM_EXIT_MMIO)")
    return sum(v.cost[c][1] for v in r.vms for c in cats) / n


def compare_text(results: list[tuple[str, ScenarioResult]]) -> str:
    header, rows = compare_rows(results)
    first = results[0][0]
    params = "\n".join(f"  {label}: {r.vms[0].kvm_params.header()}" for label, r in results if r.vms)
    return (f"scenario {results[0][1].name!r}, seed {results[0][1].seed}: ratios are to the first column ({first})\n"
            f"KVM module parameters per column:\n{params}\n\n"
            + format_table(header, rows) + "\n")


def compare_json(results: list[tuple[str, ScenarioResult]]) -> str:
    return json.dumps({label: r.to_dict() for label, r in results}, indent=2)


def compare_csv(results: list[tuple[str, ScenarioResult]]) -> str:
    header, rows = compare_rows(results)
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["metric", *[label for label, _ in results]])
    for label, name in COMPARE_ROWS:
        w.writerow([label, *[r.total(name) for _, r in results]])
    w.writerow(["mmio_miss_rate_pct", *[round(_miss_rate(r), 4) for _, r in results]])
    w.writerow(["mmio_fastpath_stale_generation", *[r.total("mmio_fastpath_invalid") for _, r in results]])
    w.writerow(["overhead_cycles", *[sum(v.overhead_cycles for v in r.vms) for _, r in results]])
    w.writerow(["modelled_s", *[r.modelled_s for _, r in results]])
    return out.getvalue()
