"""The Linux-boot experiment: a real guest's MMIO accesses (Linux 6.1 booting on a 2-vCPU PC) replayed
under each MMU flavour and MMIO policy, with KVM's counters per boot phase and in total, a modelled
cost, and a paragraph that reads the numbers.

    report = run_linux_boot(("shadow", "ept"), ("off", "generation"), limit=20_000)
    print(format_linux_boot(report))

or ``kvmmu linux-boot [--trace DIR] [--limit N] [--mmu shadow,ept] [--policy off,zap,generation]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ScenarioError
from ..guest.linux_boot import PROFILES, LinuxBootWorkload, load_linux_boot
from ..guest.trace import PhaseResult, ReplayResult
from ..kvm.vm import MMIO_POLICIES, MMU_FLAVOURS
from ..sim.cost import CostModel
from .table import format_table

# (label, where, name): where is "stats" (KVM vCPU stats), "counters" (the model's) or "run" (replay).
METRICS = (
    ("MMIO accesses", "run", "mmio_accesses"),
    ("exits to userspace", "counters", "userspace_exits"),
    ("in-kernel handled", "counters", "iobus_handled"),
    ("full faults (pf_taken)", "stats", "pf_taken"),
    ("MMIO sptes created", "stats", "pf_mmio_spte_created"),
    ("fast path hits (spte)", "counters", "mmio_fastpath"),
    ("MMIO cache hits", "counters", "mmio_cache_hits"),
    ("guest walks", "counters", "guest_walks"),
    ("memslot lookups", "counters", "memslot_lookups"),
)
_SHORT = ("mmio", "to VMM", "in-kernel", "pf_taken", "spte+", "fast", "cache", "walks", "slots")


@dataclass
class LinuxBootRun:
    flavour: str
    policy: str
    result: ReplayResult
    cycles: int
    cycles_by_phase: dict[str | None, int]

    def value(self, where: str, name: str, phase: PhaseResult | None = None) -> int:
        p = phase if phase is not None else self.result.total
        if where == "run":
            return getattr(p, name)
        return p.metric(where, name)

    @property
    def mmio_accesses(self) -> int:
        return self.result.total.mmio_accesses

    @property
    def fast_share(self) -> float:
        """Share of the MMIO accesses that KVM completed without its full fault path."""
        t = self.result.total
        return (t.mmio_accesses - t.mmio_full_path) / t.mmio_accesses if t.mmio_accesses else 0.0


@dataclass
class LinuxBootReport:
    workload: LinuxBootWorkload
    limit: int | None
    profile: str
    runs: list[LinuxBootRun] = field(default_factory=list)
    cost: CostModel = field(default_factory=CostModel)

    def run(self, flavour: str, policy: str) -> LinuxBootRun:
        for r in self.runs:
            if (r.flavour, r.policy) == (flavour, policy):
                return r
        raise KeyError((flavour, policy))


def run_linux_boot(flavours: tuple[str, ...] | list[str] = ("shadow", "ept"),
                   policies: tuple[str, ...] | list[str] = MMIO_POLICIES, limit: int | None = None, *,
                   profile: str = "irqchip", cost: CostModel | None = None,
                   workload: LinuxBootWorkload | None = None,
                   progress: Callable[[float], None] | None = None) -> LinuxBootReport:
    """Replay the first `limit` MMIO accesses of the boot (all if None) under every flavour x policy:
    the shipped boot, or `workload` (`load_linux_boot(DIR)` of a recorded trace directory)."""
    for f in flavours:
        if f not in MMU_FLAVOURS:
            raise ScenarioError(f"flavour={f!r}: the MMU flavour is one of {MMU_FLAVOURS}")
    for p in policies:
        if p not in MMIO_POLICIES:
            raise ScenarioError(f"policy={p!r}: the MMIO policy is one of {MMIO_POLICIES}")
    if profile not in PROFILES:
        raise ScenarioError(f"profile={profile!r}: the device profile is one of {PROFILES}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ScenarioError(f"limit={limit!r}: the number of MMIO accesses to replay is an integer >= 0")
    model = cost or CostModel()
    workload = workload if workload is not None else load_linux_boot()
    report = LinuxBootReport(workload, limit, profile, cost=model)
    combos = [(f, p) for f in flavours for p in policies]
    for i, (f, p) in enumerate(combos):
        part = None
        if progress is not None:
            def part(x: float, i: int = i) -> None:
                progress((i + x) / len(combos))
        res = workload.replay(f, p, limit, profile=profile, progress=part)
        by_phase = {ph.phase: model.cycles(ph.stats, ph.counters) for ph in res.phases}
        report.runs.append(LinuxBootRun(f, p, res, model.cycles(res.total.stats, res.total.counters), by_phase))
    return report


# -- text ------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _workload_section(w: LinuxBootWorkload, limit: int | None, profile: str) -> list[str]:
    out = [f"Workload: {w.machine} (recorded trace {w.source}, {w.nr_vcpus} vCPUs, "
           f"{w.rows:,} rows: {w.rows_by_kind.get('mmio', 0):,} mmio, {w.rows_by_kind.get('pio', 0):,} pio, "
           f"{w.rows_by_kind.get('dev', 0):,} dev).",
           f"The {w.mmio_rows:,} mmio rows are {w.mmio_accesses:,} CPU accesses ({w.split_rows_merged:,} rows were "
           "pieces of a wider access split by the recording VMM); pio and dev rows are counted, not replayed."]
    per_phase: dict[str | None, int] = {p: 0 for p in w.phases}   # a record outside any phase: None
    for i in w.mmio_index:
        per_phase[w.records[i].phase] = per_phase.get(w.records[i].phase, 0) + 1
    rows = [[p, c.get("mmio", 0), per_phase.get(p, 0), c.get("pio", 0), c.get("dev", 0)]
            for p, c in w.rows_by_phase_kind.items()]
    rows.append(["total", w.rows_by_kind.get("mmio", 0), w.mmio_accesses, w.rows_by_kind.get("pio", 0),
                 w.rows_by_kind.get("dev", 0)])
    out += ["", format_table(["phase", "mmio rows", "MMIO accesses", "pio rows", "dev rows"], rows), ""]
    slots = ", ".join(f"[{r.start:#x}, {r.end:#x}) {r.kind}" for r in w.memory)
    out.append(f"Memslots ({len(w.memory)}): {slots}.")
    out.append("In the kernel: LAPIC 0xfee00000 and IOAPIC 0xfec00000 (in-kernel irqchip)" +
               ("; QEMU's coalesced VGA window and virtio-notify ioeventfds." if profile == "qemu" else
                "; every other device exits to the VMM."))
    if w.conflicts:
        out.append("Mapping conflicts (replayed as iounmap + INVLPG on every vCPU + ioremap): " +
                   "; ".join(str(c) for c in w.conflicts) + ".")
    else:
        out.append("Mapping: every gva page maps one gpa page throughout.")
    if w.problems:
        out.append(f"Consistency problems ({len(w.problems)}): " + "; ".join(w.problems[:5]))
    if limit is not None and limit < w.mmio_accesses:
        out.append(f"Replayed: the first {limit:,} of {w.mmio_accesses:,} MMIO accesses.")
    return out


def _totals_table(report: LinuxBootReport) -> str:
    runs = report.runs
    header = ["", *[f"{r.flavour}/{r.policy}" for r in runs]]
    rows: list[list[object]] = [[label, *[r.value(where, name) for r in runs]] for label, where, name in METRICS]
    rows.append(["fast-path share", *[_pct(r.fast_share) for r in runs]])
    rows.append(["modelled Mcycles", *[r.cycles / 1e6 for r in runs]])
    rows.append(["cycles per MMIO access", *[r.cycles / r.mmio_accesses if r.mmio_accesses else 0.0 for r in runs]])
    return format_table(header, rows)


def _phase_table(run: LinuxBootRun) -> str:
    header = ["phase", *_SHORT, "kcycles"]
    rows = []
    for ph in [*run.result.phases, run.result.total]:
        name = ph.phase if ph is not run.result.total else "total"
        cyc = run.cycles if ph is run.result.total else run.cycles_by_phase.get(ph.phase, 0)
        rows.append([name, *[run.value(where, n, ph) for _, where, n in METRICS], round(cyc / 1000)])
    return format_table(header, rows)


def reading(report: LinuxBootReport) -> list[str]:
    """'What the model makes of it': sentences computed from the runs."""
    out: list[str] = []
    runs = report.runs
    if not runs:
        return out
    first = runs[0]
    n = first.mmio_accesses
    to_vmm = first.value("counters", "userspace_exits")
    kernel = first.value("counters", "iobus_handled")
    same_exits = len({r.value("counters", "userspace_exits") for r in runs}) == 1
    out.append(f"Of the {n:,} MMIO accesses, {to_vmm:,} ({_pct(to_vmm / n if n else 0)}) exited to the VMM and "
               f"{kernel:,} pieces were completed by in-kernel devices" +
               (" under every flavour and policy: caching MMIO translations changes KVM's own work before the "
                "access is emulated, never where the access is completed." if same_exits else
                "; the number of exits differs between runs, which the MMIO policy alone should not cause."))
    flavours = list(dict.fromkeys(r.flavour for r in runs))
    for f in flavours:
        by = {r.policy: r for r in runs if r.flavour == f}
        gen, off, zap = by.get("generation"), by.get("off"), by.get("zap")
        parts = []
        if gen is not None:
            t = gen.result.total
            parts.append(f"with today's design {_pct(gen.fast_share)} of the MMIO accesses were resolved by the "
                         f"fast path (MMIO spte or per-vCPU cache); {t.mmio_full_path:,} met the full fault path (a "
                         "first touch of an MMIO page or of a guest page-table page) and "
                         f"{gen.value('stats', 'pf_mmio_spte_created'):,} MMIO sptes were created")
        if off is not None:
            parts.append(f"with caching off all {off.result.total.mmio_full_path:,} took the full path, costing "
                         f"{off.value('counters', 'guest_walks'):,} guest walks and "
                         f"{off.value('counters', 'memslot_lookups'):,} memslot lookups")
        if off is not None and gen is not None and off.mmio_accesses and gen.mmio_accesses:
            a, b = off.cycles / off.mmio_accesses, gen.cycles / gen.mmio_accesses
            parts.append(f"modelled cost per MMIO access {a:,.0f} -> {b:,.0f} cycles "
                         f"({_pct(1 - b / a if a else 0)} less)")
        if zap is not None and gen is not None:
            same = (zap.result.total.stats == gen.result.total.stats
                    and zap.result.total.counters == gen.result.total.counters)
            parts.append("'zap' (2011) and 'generation' gave identical counters, as they must when no memslot "
                         "changes during the run" if same else
                         "'zap' and 'generation' differ (memslots changed during the run)")
        if parts:
            out.append(f"{f}: " + "; ".join(parts) + ".")
    gen_runs = [r for r in runs if r.policy == "generation"]
    if gen_runs:
        r = max(gen_runs, key=lambda x: x.cycles)
        parts_ = report.cost.breakdown(r.result.total.stats, r.result.total.counters)
        share = parts_["userspace_exit"] / r.cycles if r.cycles else 0.0
        out.append(f"Under {r.flavour}/generation the trips to the VMM are {_pct(share)} of the modelled cost: "
                   "once MMIO translations are cached, what remains is the exit and the emulation, not the MMU.")
        busiest = max(r.result.phases, key=lambda p: p.mmio_accesses)
        out.append(f"The busiest phase is {busiest.phase} ({busiest.mmio_accesses:,} MMIO accesses, "
                   f"{_pct(busiest.mmio_accesses / n if n else 0)} of them).")
    shadow = next((r for r in gen_runs if r.flavour == "shadow"), None)
    tdp = next((r for r in gen_runs if r.flavour != "shadow"), None)
    if shadow is not None and tdp is not None:
        out.append(f"Shadow paging created {shadow.value('stats', 'pf_mmio_spte_created')} MMIO sptes, "
                   f"{tdp.flavour} {tdp.value('stats', 'pf_mmio_spte_created')}: shadow MMIO sptes are per guest "
                   "mapping (gva page, in each paging mode), TDP ones per gfn; the vCPUs share both.")
    bad = [r for r in runs if r.result.fault_count or r.result.mismatch_count or r.result.misrouted
           or r.result.undelivered]
    if bad:
        out.append("Replay problems: " + "; ".join(
            f"{r.flavour}/{r.policy}: {r.result.fault_count} guest faults, {r.result.mismatch_count} read values "
            f"differ, {r.result.misrouted} misrouted, {r.result.undelivered} undelivered" for r in bad) + ".")
    else:
        out.append(f"Every read returned the recorded value ({first.result.values_checked:,} checked per run), "
                   "no access faulted, and every device access arrived at its recorded gpa.")
    return out


def format_linux_boot(report: LinuxBootReport) -> str:
    lines = _workload_section(report.workload, report.limit, report.profile)
    lines += ["", "Totals (KVM counters summed over the vCPUs; 'fast path hits' and 'MMIO cache hits' are the "
              "model's):", "", _totals_table(report)]
    for run in report.runs:
        lines += ["", f"Per phase, {run.flavour}/{run.policy}:", "", _phase_table(run)]
    lines += ["", "What the model makes of it:", ""]
    lines += [f"- {s}" for s in reading(report)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmmu.report.linux_boot ...``: the same as ``kvmmu linux-boot ...``."""
    import sys

    from ..cli import main as cli_main
    return cli_main(["linux-boot", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
