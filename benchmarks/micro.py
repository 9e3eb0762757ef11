"""The per-path figures: TLB hits, full shadow faults, MMIO (fast and full path), cold guest walks.

Every benchmark checks, with KVM's own counters, that it measured the path it names (all TLB hits,
one full fault per access, no pf_* stat on the MMIO fast path, ...), so a change that silently
sends accesses down another path cannot improve a figure.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.arch.modes import PagingContext
from kvmmu.arch.walker import walk
from kvmmu.guest.pagetables import RW, US, GuestPageTables, P, vm_writer
from kvmmu.hw.memory import SparseMemory

from .harness import Figure, best_rate, clock

LONG_MODE = dict(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
A = 1 << 5
MMIO_GVA = 0x4000_0000
MMIO_GPA = 0xD000_0000            # no memslot there: MMIO
TLB_HIT_TARGET = 2_000_000
FAULT_TARGET = 100_000
MMIO_FAST_TARGET = 125_000        # 1.5 x the ~84k/s measured on the real /dev/kvm (issue 7)


class BenchError(AssertionError):
    """A benchmark did not exercise the path it claims to measure."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise BenchError(what)


def long_mode_guest(mmu: str = "shadow", mmio_caching: str = "generation", ram: int = 64 << 20,
                    pool: int = 0x10_0000, tdp_mmu: bool = True) -> tuple[kvmmu.VM, GuestPageTables, kvmmu.Vcpu]:
    """A VM with `ram` bytes at gpa 0, 4-level guest tables from `pool` (VMM-written), one vCPU."""
    vm = kvmmu.VM(mmu=mmu, mmio_caching=mmio_caching, tdp_mmu=tdp_mmu)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=ram)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=pool, pool_end=pool + (16 << 20))
    vcpu = vm.create_vcpu()
    return vm, pt, vcpu


# -- TLB hits ------------------------------------------------------------------------------------
def tlb_hit_ops(pages: int, n: int, base: int, seed: int) -> list[tuple[int, int, str, int | None]]:
    """n accesses of 1-8 bytes (naturally aligned, so within a page), half reads and half writes."""
    rng = random.Random(seed)
    ops: list[tuple[int, int, str, int | None]] = []
    for _ in range(n):
        size = rng.choice((1, 2, 4, 8))
        gva = base + rng.randrange(pages) * 0x1000 + rng.randrange(0x1000 // size) * size
        if rng.random() < 0.5:
            ops.append((gva, size, "read", None))
        else:
            ops.append((gva, size, "write", rng.getrandbits(8 * size)))
    return ops


def bench_tlb_hits(n: int = 200_000, repeats: int = 3, seed: int = 1) -> list[Figure]:
    vm, pt, vcpu = long_mode_guest()
    pages, base = 64, 0x1000_0000
    for i in range(pages):
        pt.map(base + i * 0x1000, 0x40_0000 + i * 0x1000, flags=P | RW | US)
    vcpu.set_sregs(cr3=pt.cr3, **LONG_MODE)
    for i in range(pages):                       # fault every page in, writable and dirty
        r = vcpu.access(base + i * 0x1000, 8, "write", i)
        check(r.fault is None, "warm-up write faulted")
    ops = tlb_hit_ops(pages, n, base, seed)
    access = vcpu.access

    def run() -> tuple[int, float]:
        before = dict(vcpu.counters), vcpu.stats["exits"]
        t0 = clock()
        for gva, size, kind, value in ops:
            access(gva, size, kind, value)
        dt = clock() - t0
        check(vcpu.counters["tlb_hits"] - before[0]["tlb_hits"] == n, "not every access was a TLB hit")
        check(vcpu.counters["hw_walks"] == before[0]["hw_walks"] and vcpu.stats["exits"] == before[1],
              "a TLB-hit access walked or exited")
        return n, dt

    per_call, _, _ = best_rate(run, repeats)
    figs = []
    if hasattr(vcpu, "run_accesses"):
        from kvmmu.hw.cpu import DecodedAccesses
        decoded = DecodedAccesses(ops)

        def run_batch(batch: object) -> tuple[int, float]:
            before = vcpu.counters["tlb_hits"]
            t0 = clock()
            done, bad = vcpu.run_accesses(batch)
            dt = clock() - t0
            check(done == n and bad is None and vcpu.counters["tlb_hits"] - before == n,
                  "not every batched access was a TLB hit")
            return n, dt

        rate, _, _ = best_rate(lambda: run_batch(decoded), repeats)
        figs.append(Figure("TLB-hit RAM accesses (run_accesses, decoded)", rate, "acc/s", TLB_HIT_TARGET,
                           note="1 vCPU, shadow, 1-8 B, 50% writes, replayed"))
        rate, _, _ = best_rate(lambda: run_batch(ops), repeats)
        figs.append(Figure("  the same, run_accesses(list)", rate, "acc/s", TLB_HIT_TARGET,
                           note="decoded on every call"))
    figs.append(Figure("  the same, one vcpu.access() per access", per_call, "acc/s", TLB_HIT_TARGET,
                       note="AccessResult per access"))
    return figs


# -- full shadow faults --------------------------------------------------------------------------
def bench_shadow_faults(n: int = 16_384, repeats: int = 2) -> list[Figure]:
    """Reads of n fresh pages: each one is a #PF exit, a guest walk through memslots and an spte install.

    The guest PTEs have A clear, so FNAME(pte_prefetch) maps no neighbour ahead: one fault per page.
    """
    base_gva, base_gpa = 0x1_0000_0000, 0x100_0000

    def run() -> tuple[int, float]:
        vm, pt, vcpu = long_mode_guest(ram=base_gpa + n * 0x1000 + (1 << 20))
        for i in range(n):
            pt.map(base_gva + i * 0x1000, base_gpa + i * 0x1000, flags=P | RW | US)
        vcpu.set_sregs(cr3=pt.cr3, **LONG_MODE)
        vcpu.access(base_gva, 8, "read")          # the first entry: roots, TLB flush request
        before = vcpu.stats["pf_fixed"]
        access = vcpu.access
        t0 = clock()
        for i in range(1, n):
            access(base_gva + i * 0x1000, 8, "read")
        dt = clock() - t0
        check(vcpu.stats["pf_fixed"] - before == n - 1, "not exactly one full fault per fresh page")
        return n - 1, dt

    rate, _, _ = best_rate(run, repeats)
    return [Figure("full shadow faults (fresh pages)", rate, "faults/s", FAULT_TARGET,
                   note="guest walk + spte install + retry")]


# -- TDP faults ----------------------------------------------------------------------------------
def bench_tdp_faults(n: int = 8_192, repeats: int = 2) -> list[Figure]:
    """NPT faults on fresh pages, the TDP MMU (kvm_tdp_mmu_map) next to the legacy MMU (__direct_map).

    Paging is off in the guest, so each access is one NPT walk; the pages are 8 apart, so the legacy
    MMU's prefetch (one 8-entry block) maps no page of a later access: one fault per page either way.
    """
    figs = []
    for tdp_mmu in (True, False):
        def run(tdp_mmu: bool = tdp_mmu) -> tuple[int, float]:
            vm = kvmmu.VM(mmu="npt", tdp_mmu=tdp_mmu)
            vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=(8 * n + 16) << 12)
            vcpu = vm.create_vcpu()
            vcpu.set_sregs(cr0=X86_CR0_PE)
            vcpu.access(0, 8, "read")
            before = vcpu.stats["pf_fixed"]
            access = vcpu.access
            t0 = clock()
            for i in range(1, n):
                access(i << 15, 8, "read")
            dt = clock() - t0
            check(vcpu.stats["pf_fixed"] - before == n - 1, "not exactly one NPT fault per fresh page")
            return n - 1, dt

        rate, _, _ = best_rate(run, repeats)
        figs.append(Figure(f"NPT faults (fresh pages), {'TDP MMU' if tdp_mmu else 'legacy MMU'}", rate, "faults/s",
                           FAULT_TARGET if tdp_mmu else None,
                           note="kvm_tdp_mmu_map: tdp_iter walk, tables on the way down" if tdp_mmu
                           else "__direct_map + prefetch of the 8-entry block"))
    return figs


# -- MMIO ----------------------------------------------------------------------------------------
def mmio_rate(mmu: str, policy: str, n: int, repeats: int, tdp_mmu: bool = True, pages: int = 1,
              doorbell: bool = False) -> float:
    """The real-KVM loop `mov [rdi], ecx; dec ecx; jnz` as the model sees it: n 4-byte MMIO writes.

    `pages` > 1 alternates between MMIO pages, so the per-vCPU MMIO cache misses and every fast-path
    exit walks KVM's tables locklessly (get_mmio_spte; kvm_tdp_mmu_get_walk on the TDP MMU).
    `doorbell`: the page's first address is a length-0 ioeventfd (EPT: the fast MMIO bus)."""
    vm, pt, vcpu = long_mode_guest(mmu=mmu, mmio_caching=policy, tdp_mmu=tdp_mmu)
    for p in range(pages):
        pt.map(MMIO_GVA + 0x1000 * p, MMIO_GPA + 0x1000 * p, flags=P | RW)
    fd = vm.ioeventfd(MMIO_GPA, 0) if doorbell else None
    vcpu.set_sregs(cr3=pt.cr3, **LONG_MODE)
    seen = [0]

    def handler(exit_: kvmmu.MmioExit) -> int:
        seen[0] += 1
        return 0

    vm.mmio_handler = handler
    for p in range(pages):
        vcpu.access(MMIO_GVA + 0x1000 * p, 4, "write", 0)     # the first access takes the full path
    fast = policy != "off"
    gvas = [MMIO_GVA + 0x1000 * (i % pages) for i in range(n)]

    def run() -> tuple[int, float]:
        vm.mmio_log.clear()
        s0, c0, h0 = dict(vcpu.stats), dict(vcpu.counters), seen[0]
        access = vcpu.access
        t0 = clock()
        for ecx in range(n, 0, -1):
            access(gvas[ecx - 1], 4, "write", ecx)
        dt = clock() - t0
        s, c = vcpu.stats, vcpu.counters
        if fd is not None:
            check(c["fast_mmio"] - c0["fast_mmio"] == n and s["pf_taken"] == s0["pf_taken"],
                  "a doorbell write left the fast MMIO bus")
            return n, dt
        check(s["mmio_exits"] - s0["mmio_exits"] == n and seen[0] - h0 == n, "not one MMIO exit per write")
        if fast:
            check(s["pf_taken"] == s0["pf_taken"], "an MMIO write left the fast path")
            check(c["mmio_cache_hits"] + c["mmio_fastpath"] - c0["mmio_cache_hits"] - c0["mmio_fastpath"] >= n,
                  "the fast path was not taken")
        else:
            check(s["pf_taken"] - s0["pf_taken"] == n, "mmio_caching=off must take the full path every time")
        return n, dt

    rate, _, _ = best_rate(run, repeats)
    vm.mmio_log.clear()
    return rate


def bench_mmio(n: int = 40_000, repeats: int = 3) -> list[Figure]:
    figs = [Figure("MMIO fast path, shadow", mmio_rate("shadow", "generation", n, repeats), "acc/s",
                   MMIO_FAST_TARGET, note="MMIO spte/cache -> emulate -> handler")]
    for tdp_mmu in (True, False):
        figs.append(Figure(f"MMIO fast path, ept ({'TDP' if tdp_mmu else 'legacy'} MMU)",
                           mmio_rate("ept", "generation", n, repeats, tdp_mmu), "acc/s", MMIO_FAST_TARGET,
                           note="misconfig -> gpa cache -> emulate -> handler"))
    for tdp_mmu in (True, False):
        figs.append(Figure(f"  two MMIO pages alternating, ept ({'TDP' if tdp_mmu else 'legacy'} MMU)",
                           mmio_rate("ept", "generation", n, repeats, tdp_mmu, pages=2), "acc/s",
                           note="cache misses: lockless walk" + (" (kvm_tdp_mmu_get_walk)" if tdp_mmu else "")))
    figs.append(Figure("  doorbell on the fast MMIO bus, ept (TDP MMU)",
                       mmio_rate("ept", "generation", n, repeats, doorbell=True), "acc/s",
                       note="length-0 ioeventfd: no decode, no MMU"))
    for mmu in ("shadow", "ept"):
        figs.append(Figure(f"MMIO full path (mmio_caching=off), {mmu}", mmio_rate(mmu, "off", n, repeats),
                           "acc/s", note="informational"))
    return figs


# -- cold 4-level walks --------------------------------------------------------------------------
def walk_tables(regions: int = 512, per_region: int = 128, seed: int = 3
                ) -> tuple[SparseMemory, int, list[int], list[int], int]:
    """4-level tables in a SparseMemory: `regions` page tables (spread over PML4/PDPT/PD entries),
    `per_region` mapped pages in each; A is set everywhere, so a walk only reads.

    Returns (memory, cr3, gvas in a seeded random order, expected gpas, end of the table pool).
    """
    mem = SparseMemory(1 << 46, name="guest physical memory")
    pool = 0x1000
    pt = GuestPageTables("4level", lambda a, s, v: mem.write(a, s, v), mem.read, pool=pool,
                         pool_end=pool + (64 << 20))
    rng = random.Random(seed)
    gvas: list[int] = []
    gpas: list[int] = []
    frame = 0x1_0000_0000
    for r in range(regions):
        region = ((r % 4) << 39) | (((r // 4) % 16) << 30) | ((r // 64) << 21)
        for p in rng.sample(range(512), per_region):
            gva = region | (p << 12)
            pt.map(gva, frame, flags=P | RW | US | A, upper=P | RW | US | A)
            off = rng.randrange(0x1000)
            gvas.append(gva | off)
            gpas.append(frame | off)
            frame += 0x1000
    order = list(range(len(gvas)))
    rng.shuffle(order)
    return mem, pt.cr3, [gvas[i] for i in order], [gpas[i] for i in order], pt.next


def bench_cold_walks(rounds: int = 5) -> list[Figure]:
    """walk() over fresh tables, and volatility3 over the same tables when it is importable.

    The two are measured in alternating rounds (best round of each), so that a change in the
    machine's load during the benchmark does not land on one side of the ratio only.
    """
    mem, cr3, gvas, gpas, pool_end = walk_tables()
    ctx = PagingContext("4level", nxe=True, wp=True, ad_policy="hardware")
    check([walk(ctx, mem, cr3, g, 0).gpa for g in gvas[:2000]] == gpas[:2000], "the walker mistranslated")
    chunk = len(gvas) // rounds

    def model(k: int) -> tuple[int, float]:
        part = gvas[k * chunk:(k + 1) * chunk]
        t0 = clock()
        for gva in part:
            walk(ctx, mem, cr3, gva, 0)
        return len(part), clock() - t0

    vol = volatility_runs(mem, cr3, gvas, gpas, pool_end)
    best = {"model": 0.0, "cold": 0.0, "warm": 0.0}
    for k in range(rounds):
        runs = [("model", lambda k=k: model(k))]
        if vol is not None:
            runs += [("cold", lambda k=k: vol[0](k, rounds)), ("warm", lambda k=k: vol[1](k, rounds))]
        for name, run in runs:
            rate = best_rate(run, 1)[0]
            best[name] = max(best[name], rate)
    rate = best["model"]
    figs = [Figure("cold 4-level guest walks (arch walker)", rate, "walks/s",
                   note=f"{len(gvas):,} distinct pages, 512 page tables")]
    if vol is None:
        figs.append(Figure("  model / volatility3 Intel32e, cold", None, "x", 3.0,
                           note="volatility3 not importable: pip install volatility3"))
        return figs
    cold, warm = best["cold"], best["warm"]
    figs.append(Figure("  volatility3 Intel32e, cold (caches cleared)", cold, "walks/s", note="informational"))
    figs.append(Figure("  model / volatility3, cold", rate / cold, "x", 3.0))
    figs.append(Figure("  volatility3 Intel32e, own table cache", warm, "walks/s", note="informational"))
    figs.append(Figure("  model / volatility3 with its table cache", rate / warm, "x",
                       note="informational: its 1025-table LRU vs no cache"))
    return figs


def volatility_runs(mem: SparseMemory, cr3: int, gvas: list[int], gpas: list[int], pool_end: int
                    ) -> tuple[Callable[[int, int], tuple[int, float]], Callable[[int, int], tuple[int, float]]] | None:
    """volatility3's Intel32e layer over the same tables, as two benchmarks of round k of n: cold (its
    LRU caches cleared before every translation; a quarter of the round's pages, it is slow) and
    with its own table cache (a fresh layer, every page of the round translated once).

    `_translate` is the layer's page walk (what `translate`/`mapping` call); the public wrappers add
    a validity check of the physical address, which needs the data pages in the buffer too.
    """
    try:
        from volatility3.framework import contexts
        from volatility3.framework.layers import intel, physical
    except Exception:
        return None
    buffer = mem.read_bytes(0, pool_end)

    def layer() -> intel.Intel32e:
        ctx = contexts.Context()
        ctx.add_layer(physical.BufferDataLayer(ctx, "bench.base", "base", buffer))
        ctx.config["bench.intel.memory_layer"] = "base"
        ctx.config["bench.intel.page_map_offset"] = cr3
        lay = intel.Intel32e(ctx, "bench.intel", "intel")
        ctx.add_layer(lay)
        intel.Intel32e._translate_entry.cache_clear()
        intel.Intel32e._get_valid_table.cache_clear()
        return lay

    lay = layer()
    got = [lay._translate(g)[0] for g in gvas[:2000]]
    check(got == gpas[:2000], "volatility3 disagrees with the model's walker")

    def cold(k: int, n: int) -> tuple[int, float]:
        chunk = len(gvas) // n
        part = gvas[k * chunk:k * chunk + chunk // 4]
        translate = layer()._translate
        clear_entry = intel.Intel32e._translate_entry.cache_clear
        clear_table = intel.Intel32e._get_valid_table.cache_clear
        t0 = clock()
        for g in part:
            clear_entry()
            clear_table()
            translate(g)
        return len(part), clock() - t0

    def warm(k: int, n: int) -> tuple[int, float]:
        chunk = len(gvas) // n
        part = gvas[k * chunk:(k + 1) * chunk]
        translate = layer()._translate
        t0 = clock()
        for g in part:
            translate(g)
        return len(part), clock() - t0

    return cold, warm
