"""The seed's experiment: one guest access stream, every MMU flavour x MMIO policy, side by side.

The guest is a driver loop on a kernel-like address space: a direct map of RAM (2 MiB pages) and an
ioremap'd device with two register pages; each iteration touches a few RAM pages, rings a doorbell
(MMIO write on one page) and reads a status register (MMIO read on the other page), so the per-vCPU
MMIO cache (one entry) and the MMIO sptes both get work.  Midway the VMM hot-plugs an unrelated memslot, which is where
the policies differ: "zap" (2011) drops every shadow page, "generation" only makes MMIO sptes stale.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from ..guest.pagetables import PCD, RW, GuestPageTables, P, vm_writer
from ..guest.program import run_program
from ..kvm.vm import VM
from .cost import CostModel

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


def driver_loop(flavour: str, policy: str, iterations: int = 2000, seed: int = 1,
                cost: CostModel | None = None) -> RunResult:
    vm = VM(mmu=flavour, mmio_caching=policy)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=RAM)
    status = {"value": 0}

    def vmm(exit_):
        if exit_.is_write:
            status["value"] += 1
            return None
        return status["value"]
    vm.mmio_handler = vmm
    write, read = vm_writer(vm)
    pt = GuestPageTables("4level", write, read, pool=0x100000)
    for off in range(0, RAM, 2 << 20):
        pt.map(DIRECT_MAP + off, off, 2 << 20, P | RW)
    pt.map(IOREMAP, DOORBELL_GPA, 4096, P | RW | PCD)
    pt.map(IOREMAP + 0x1000, DOORBELL_GPA + 0x1000, 4096, P | RW | PCD)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr3=pt.cr3, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
    rng = random.Random(seed)
    working_set = [rng.randrange(0x800000, RAM, 4096) for _ in range(256)]

    def program():
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
    run_program(vcpu, program())
    vm.audit()
    model = cost or CostModel()
    stats, counters = vcpu.stats.snapshot(), vcpu.counters.snapshot()
    return RunResult(flavour, policy, stats, counters, vm.stats.snapshot(), 2 * iterations,
                     model.cycles(stats, counters))


def policy_matrix(flavours: tuple[str, ...] = ("shadow", "ept"),
                  policies: tuple[str, ...] = ("off", "zap", "generation"),
                  iterations: int = 2000, seed: int = 1) -> list[RunResult]:
    return [driver_loop(f, p, iterations, seed) for f in flavours for p in policies]
