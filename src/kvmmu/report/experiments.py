"""The seed's experiment: one guest access stream, every MMU flavour x MMIO policy, side by side.

The guest is a driver loop on a kernel-like address space: a direct map of RAM (2 MiB pages) and an
ioremap'd device with two register pages; each iteration touches a few RAM pages, rings a doorbell
(MMIO write on one page) and reads a status register (MMIO read on the other page), so the per-vCPU
MMIO cache (one entry) and the MMIO sptes both get work.  Midway the VMM hot-plugs an unrelated memslot, which is where
the policies differ: "zap" (2011) drops every shadow page, "generation" only makes MMIO sptes stale.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from ..guest.pagetables import PCD, RW, GuestPageTables, P, vm_writer
from ..guest.program import run_program
from ..kvm.vm import VM
from ..sim.cost import CostModel

if TYPE_CHECKING:
    from ..kvm.emulate import MmioExit
    from ..kvm.vcpu import Vcpu
    from ..scenario import Scenario


class PartProgress(Protocol):
    """What an experiment reports progress to (cliargs.Progress): one meter per part of the run."""

    def part(self, index: int, count: int, label: str) -> Callable[[float], None]: ...

DIRECT_MAP = 0xFFFF888000000000
IOREMAP = 0xFFFFC90000000000
DOORBELL_GPA = 0xFE000000
RAM = 64 << 20

METRICS = (
    ("exits", "stats", "exits"),
    ("pf_taken", "stats", "pf_taken"),
    ("pf_fixed", "stats", "pf_fixed"),
    ("pf_emulate", "stats", "pf_emulate"),
    ("pf_mmio_spte_created", "stats", "pf_mmio_spte_created"),
    ("mmio fast path (spte)", "counters", "mmio_fastpath"),
    ("mmio cache hits", "counters", "mmio_cache_hits"),
    ("guest walks by KVM", "counters", "guest_walks"),
    ("guest PTE reads", "counters", "guest_pte_reads"),
    ("memslot lookups", "counters", "memslot_lookups"),
    ("memslot searches", "counters", "memslot_searches"),
    ("lockless shadow walks", "counters", "shadow_walks"),
    ("mmio_exits", "stats", "mmio_exits"),
    ("mmu_shadow_zapped", "vm", "mmu_shadow_zapped"),
)


@dataclass
class RunResult:
    flavour: str
    policy: str
    stats: dict[str, int]
    counters: dict[str, int]
    vm_stats: dict[str, int]
    mmio_accesses: int
    cycles: int

    def metric(self, where: str, name: str) -> int:
        return {"stats": self.stats, "counters": self.counters, "vm": self.vm_stats}[where][name]


def driver_program(vm: VM, iterations: int, seed: int) -> Iterator[tuple[Any, ...]]:
    """The driver loop's operations: RAM accesses, a doorbell write, a status read; a hot-plug halfway."""
    rng = random.Random(seed)
    working_set = [rng.randrange(0x800000, RAM, 4096) for _ in range(256)]
    for i in range(iterations):
        if i == iterations // 2:
            vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 30, memory_size=16 << 20)
        for _ in range(4):
            page = rng.choice(working_set)
            if rng.random() < 0.5:
                yield ("write", DIRECT_MAP + page + 8 * rng.randrange(512), 8, rng.getrandbits(64))
            else:
                yield ("read", DIRECT_MAP + page + 8 * rng.randrange(512), 8)
        yield ("write", IOREMAP, 4, i & 0xFFFFFFFF)
        yield ("read", IOREMAP + 0x1004, 4)


def driver_page_tables(write: Callable[[int, int, int], None], read: Callable[[int, int], int]) -> GuestPageTables:
    """The driver's kernel-like address space: RAM direct-mapped with 2 MiB pages, the device's two
    register pages ioremap'd uncached."""
    pt = GuestPageTables("4level", write, read, pool=0x100000)
    for off in range(0, RAM, 2 << 20):
        pt.map(DIRECT_MAP + off, off, 2 << 20, P | RW)
    pt.map(IOREMAP, DOORBELL_GPA, 4096, P | RW | PCD)
    pt.map(IOREMAP + 0x1000, DOORBELL_GPA + 0x1000, 4096, P | RW | PCD)
    return pt


def driver_result(flavour: str, policy: str, vm: VM, vcpu: Vcpu, iterations: int,
                  cost: CostModel | None = None) -> RunResult:
    """A finished driver loop's counters, after the MMU's audit; two device accesses per iteration."""
    vm.audit()
    stats, counters = vcpu.stats.snapshot(), vcpu.counters.snapshot()
    return RunResult(flavour, policy, stats, counters, vm.stats.snapshot(), 2 * iterations,
                     (cost or CostModel()).cycles(stats, counters))


def driver_loop(flavour: str, policy: str, iterations: int = 2000, seed: int = 1,
                cost: CostModel | None = None) -> RunResult:
    vm = VM(mmu=flavour, mmio_caching=policy)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=RAM)
    status = {"value": 0}

    def vmm(exit_: MmioExit) -> int | None:
        if exit_.is_write:
            status["value"] += 1
            return None
        return status["value"]
    vm.mmio_handler = vmm
    pt = driver_page_tables(*vm_writer(vm))
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr3=pt.cr3, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
    run_program(vcpu, driver_program(vm, iterations, seed))
    return driver_result(flavour, policy, vm, vcpu, iterations, cost)


def policy_matrix(flavours: tuple[str, ...] = ("shadow", "ept"),
                  policies: tuple[str, ...] = ("off", "zap", "generation"),
                  iterations: int = 2000, seed: int = 1) -> list[RunResult]:
    return [driver_loop(f, p, iterations, seed) for f in flavours for p in policies]


# =====================================================================================================
# The seed's experiments (docs/experiments.md).  Each returns the text it prints.
# =====================================================================================================
CONFIGS = tuple((f, p) for f in ("shadow", "ept") for p in ("off", "zap", "generation"))
POLICY_NAMES = {"off": "off (no MMIO sptes)", "zap": "zap (2011 design)", "generation": "generation (today)"}


def seed_a_scenario(duration_s: float = 0.25, seed: int = 1, mmu: str = "shadow",
                    policy: str = "generation") -> Scenario:
    """(a) Three 4-vCPU 512 MiB guests compiling a kernel on a 4-core 2 GiB host."""
    from ..scenario import Scenario
    return Scenario.from_dict(_seed_a_dict(duration_s, seed, mmu, policy), "experiment-a")


def _seed_a_dict(duration_s: float, seed: int, mmu: str, policy: str) -> dict[str, Any]:
    return {
        "name": "seed-a: three compiling guests", "seed": seed, "duration_s": duration_s,
        "host": {"cores": 4, "memory_mib": 2048, "reserved_mib": 384},
        "workload": {"kind": "kernel-compile"},
        "vm": [{"name": "guest", "count": 3, "ram_mib": 512, "vcpus": 4, "mmu": mmu, "mmio_caching": policy}],
    }


_A_HEADER = ["MMU", "MMIO policy", "MMIO accesses", "fast path", "missed fast path", "miss rate",
             "stale gen", "MMIO sptes made", "sp zapped", "sp recycled", "jobs done", "host swap-ins"]


def _a_row(f: str, p: str, total: Callable[[str], int], swapins: int) -> list[object]:
    n = total("mmio_accesses")
    miss = total("mmio_slow_path")
    return [f, POLICY_NAMES[p], n, total("mmio_fast_path"), miss, f"{100 * miss / n:.1f}%" if n else "-",
            total("mmio_fastpath_invalid"), total("pf_mmio_spte_created"), total("mmu_shadow_zapped"),
            total("mmu_recycled"), total("jobs_finished"), swapins]


def _a_text(modelled_s: float, seed: int, rows: list[list[object]], note: str = "") -> str:
    from .table import format_table
    return (f"Experiment (a): three 4-vCPU 512 MiB guests compiling on a 4-core 2 GiB host, "
            f"{modelled_s:g} modelled seconds, seed {seed}.{note}\n"
            "An MMIO access 'misses the fast path' when KVM's full fault path ran for it (pf_taken moved):\n"
            "no MMIO spte yet, a stale one (generation), or none at all (policy off).\n\n"
            + format_table(_A_HEADER, rows) + "\n")


def experiment_a(duration_s: float = 0.25, seed: int = 1, progress: PartProgress | None = None) -> str:
    rows = []
    results = []
    for i, (f, p) in enumerate(CONFIGS):
        cb = progress.part(i, len(CONFIGS), f"(a) {f}/{p}") if progress is not None else None
        r = seed_a_scenario(duration_s, seed, f, p).run(progress=cb)
        results.append(r)
        rows.append(_a_row(f, p, r.total, r.host["swapins"]))
    return _a_text(results[0].modelled_s, seed, rows)


def experiment_b(iterations: int = 200, seed: int = 1, progress: PartProgress | None = None) -> str:
    """(b) Recognising an MMIO fault: KVM's shadow walk vs the guest walk + memslot search, with and
    without the guest's page-table pages swapped out on the host."""
    from ..guest.os import GuestOS, OsParams
    from ..hw.host import Host
    from ..sim.cost import CostModel
    from ..vmm.machine import Machine, MachineSpec
    from .table import format_table
    cost = CostModel()
    rows = []
    combos = [(f, p, s) for f, p in CONFIGS for s in (False, True)]
    for n, (flavour, policy, swapped) in enumerate(combos):
        if progress is not None:
            progress.part(n, len(combos), f"(b) {flavour}/{policy}")
        host = Host(memory_limit=8 << 30)
        m = Machine(MachineSpec(name="b", ram_mib=256, vcpus=1, mmu=flavour, mmio_caching=policy), host)
        os_ = GuestOS(m, OsParams(boot_console_bytes=0), seed=seed)
        os_.boot()
        vcpu = m.vcpus[0]
        regs = [os_.ioremaps["virtio-net-cfg"] + 0x10, os_.ioremaps["pci-testdev"] + 0x10]
        tables = []
        for gva in regs:
            tables += [os_.kpgd] + [t for (lvl, key), t in os_.ktables.items() if key == gva >> (12 + 9 * lvl)]
        slot = m.vm.memslots.spaces[0]
        found = [(g, slot.search(g)) for g in tables]
        assert all(s is not None for _, s in found), "the guest OS allocates its page tables in RAM"
        pfns = sorted({s.gfn_to_hva(g) >> 12 for g, s in found if s is not None})
        for gva in regs * 2:                      # warm up: MMIO sptes exist (unless policy off)
            vcpu.access(gva, 4, "read")
        s0, c0, v0 = dict(vcpu.stats), dict(vcpu.counters), dict(m.vm.stats)
        for i in range(iterations):
            if swapped:
                host.swap_out_pages(pfns)
            vcpu.access(regs[i % 2], 4, "read")
        ds = {k: vcpu.stats[k] - s0[k] for k in s0}
        dc = {k: vcpu.counters[k] - c0[k] for k in c0}
        dv = {k: m.vm.stats[k] - v0[k] for k in v0}
        b = cost.breakdown(ds, dc, dv, flavour)
        recognise = sum(b[k] for k in ("guest_pte_read", "memslot_lookup", "memslot_search", "shadow_walk_step",
                                       "host_swapin"))
        per = iterations
        rows.append([flavour, POLICY_NAMES[policy], "yes" if swapped else "no",
                     dc["guest_pte_reads"] / per, dc["memslot_lookups"] / per, dc["memslot_searches"] / per,
                     dc["shadow_walk_steps"] / per, dc["host_swapins"] / per, ds["pf_taken"] / per,
                     round(recognise / per), round(sum(b.values()) / per)])
    header = ["MMU", "MMIO policy", "PT pages swapped", "gPTE reads", "memslot lookups", "memslot searches",
              "shadow walk steps", "host swap-ins", "pf_taken", "cycles to recognise", "cycles per access"]
    return (f"Experiment (b): recognising an MMIO access, per access ({iterations} reads alternating between two\n"
            "userspace-device pages, so the per-vCPU MMIO cache never answers).  'swapped': before every access the\n"
            "host swaps out the guest's page-table pages that map the two registers (the mmu notifier zaps their\n"
            "sptes).  'cycles to recognise' = guest PTE reads + memslot lookups/searches + shadow walk steps +\n"
            "host swap-ins, at the cost model's defaults.\n\n" + format_table(header, rows) + "\n")


COVER_LETTER = {
    # v1 cover letter (x86_64 host), averages of the three runs quoted there (docs/spec/kvm-mmu.md section 6)
    ("netperf", "ept"): ((709.58 + 715.40 + 713.45) / 3, (734.60 + 723.75 + 724.22) / 3),
    ("netperf", "shadow"): ((706.10 + 709.38 + 695.90) / 3, (709.63 + 715.80 + 710.70) / 3),
    ("kernbench", "ept"): ((154.749 + 154.651 + 154.543) / 3, (153.482 + 153.161 + 154.271) / 3),
    ("kernbench", "shadow"): ((283.467 + 285.225 + 287.029) / 3, (281.873 + 281.668 + 280.128) / 3),
}


def experiment_c(seed: int = 1, netperf_s: float = 0.3, kernbench_jobs: int = 24,
                 progress: PartProgress | None = None) -> str:
    """(c) netperf-RR-like and kernbench-like under the three policies, shadow and EPT."""
    from ..scenario import Scenario
    from .table import format_table
    out = []
    rows = []
    steps = len(CONFIGS) * 2
    k = 0
    measured: dict[tuple[str, str, str], float] = {}
    for f, p in CONFIGS:
        if progress is not None:
            progress.part(k, steps, f"(c) netperf {f}/{p}")
        k += 1
        sc = Scenario.from_dict({
            "name": "seed-c netperf", "seed": seed, "duration_s": netperf_s,
            "vm": [{"name": "guest", "ram_mib": 512, "vcpus": 1, "mmu": f, "mmio_caching": p, "nic": "e1000",
                    "msix": False, "workload": {"kind": "netperf-rr", "rtt_us": 1300.0, "stack_us": 20.0}}]},
            "experiment-c")
        r = sc.run()
        measured[("netperf", f, p)] = r.total("transactions") / r.modelled_s
        if progress is not None:
            progress.part(k, steps, f"(c) kernbench {f}/{p}")
        k += 1
        sc = Scenario.from_dict({
            "name": "seed-c kernbench", "seed": seed, "duration_s": 600.0,
            "vm": [{"name": "guest", "ram_mib": 512, "vcpus": 2, "mmu": f, "mmio_caching": p,
                    "workload": {"kind": "kernel-compile", "total_jobs": kernbench_jobs, "jobs": 4}}]},
            "experiment-c")
        r = sc.run()
        measured[("kernbench", f, p)] = r.modelled_s
    for bench, unit in (("netperf", "trans/s"), ("kernbench", "s")):
        for f in ("ept", "shadow"):
            off = measured[(bench, f, "off")]
            before, after = COVER_LETTER[(bench, f)]
            paper = (after / before - 1) * 100 if bench == "netperf" else (before - after)
            paper_rel = (after / before - 1) * 100
            for p in ("off", "zap", "generation"):
                v = measured[(bench, f, p)]
                gain = (v / off - 1) * 100
                rows.append([bench, f, POLICY_NAMES[p], f"{v:,.3f} {unit}" if bench == "kernbench" else
                             f"{v:,.1f} {unit}", f"{gain:+.2f}%",
                             (f"{paper:+.2f}% ({before:.1f} -> {after:.1f})" if bench == "netperf" else
                              f"{-paper:+.2f} s, {paper_rel:+.2f}% ({before:.1f} -> {after:.1f} s)")
                             if p == "zap" else ""])
    out.append("Experiment (c): netperf TCP_RR-like (one stream, e1000-like NIC: 5 MMIO accesses + EOI per\n"
               "transaction, 1.3 ms wire/peer time) and kernbench-like (a fixed number of compile jobs, modelled\n"
               "completion time) with the three MMIO policies, under EPT and shadow paging; the model's change vs\n"
               "policy off, next to the 2011 v1 cover letter's before -> after (its 'after' is the zap design).\n")
    out.append(format_table(["benchmark", "MMU", "MMIO policy", "modelled", "vs off", "2011 cover letter"], rows))
    return "\n".join(out) + "\n"


def run_experiment(which: str, full: bool = False, seed: int = 1, progress: PartProgress | None = None,
                   duration: float | None = None, engine: dict | None = None,
                   on_engine: Callable[..., str] | None = None) -> str:
    """(a) --full runs on the sweep engine, a layer above this one: `on_engine` is
    kvmmu.sweep.experiment_a_on_engine, called with `engine` (results, scheduler, workers, quiet)."""
    if which == "a":
        d = duration if duration is not None else (3600.0 if full else 0.25)
        if full:
            if on_engine is None:
                raise ValueError("experiment a --full runs on the sweep engine: pass on_engine")
            return on_engine(d, seed, **(engine or {}))
        return experiment_a(d, seed, progress)
    if which == "b":
        return experiment_b(2000 if full else 200, seed, progress)
    if which == "c":
        return experiment_c(seed, netperf_s=duration or (3.0 if full else 0.3),
                            kernbench_jobs=240 if full else 24, progress=progress)
    raise ValueError(which)
