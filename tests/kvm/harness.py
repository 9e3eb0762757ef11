"""A small shadow-paging guest for the KVM scenario tests, and spec-derived helpers.

Guest-physical layout (slot 0 = RAM [0, 32 MiB) unless a test says otherwise):

    WARM      0x0001_0000   a page touched once at setup (takes the vCPU's first-entry TLB flush)
    POOL      0x0010_0000   the guest's page tables; identity-mapped (gva == gpa) so the guest can
                            write its own tables through its vCPU
    DATA      0x0040_0000   data pages, identity-mapped on demand by the tests
    MMIO_GPA  0xD000_0000   no memslot: MMIO; the guest maps MMIO_GVA -> MMIO_GPA

Expected values in the tests come from docs/spec/kvm-mmu.md; the helpers here only *observe* the
model (stats, the per-vCPU MMIO cache, KVM's sptes) and decode MMIO sptes with the spec's formulas
(§2.5.2), never with the model's own decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.guest.pagetables import RW, US, GuestPageTables, P, vcpu_writer, vm_writer

MiB = 1 << 20
RAM_SIZE = 32 * MiB
WARM = 0x1_0000
POOL = 0x10_0000
POOL_END = 0x20_0000
DATA = 0x40_0000
MMIO_GPA = 0xD000_0000
MMIO_GVA = 0x4000_0000
PAGE = 0x1000
PAGE_MASK = ~0xFFF
GEN_MASK = (1 << 19) - 1                  # §2.5.2 MMIO_SPTE_GEN_MASK
IN_PROGRESS = 1 << 63                      # §2.7 KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
LONG_MODE = dict(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
RWU = P | RW | US


# -- stats snapshots ----------------------------------------------------------------------------------
@dataclass
class Delta:
    """after - before for one vCPU's KVM stats, the VM's KVM stats and the vCPU's model counters."""

    vcpu: dict[str, int]
    vm: dict[str, int]
    model: dict[str, int]

    def moved(self) -> dict[str, dict[str, int]]:
        return {k: {n: v for n, v in d.items() if v} for k, d in
                (("vcpu", self.vcpu), ("vm", self.vm), ("model", self.model))}


class Snapshot:
    def __init__(self, vm: kvmmu.VM, vcpu: kvmmu.Vcpu) -> None:
        self.vm, self.vcpu = vm, vcpu
        self.vcpu_stats = dict(vcpu.stats)
        self.vm_stats = dict(vm.stats)
        self.model = dict(vcpu.counters)

    def delta(self) -> Delta:
        return Delta({k: v - self.vcpu_stats[k] for k, v in self.vcpu.stats.items()},
                     {k: v - self.vm_stats[k] for k, v in self.vm.stats.items()},
                     {k: v - self.model[k] for k, v in self.vcpu.counters.items()})


def assert_pf(d: Delta, **expected: int) -> None:
    """Every `pf_*` stat of the vCPU moved by exactly `expected` (0 when not named); other named
    vCPU stats (mmio_exits, exits, ...) are checked too."""
    names = [n for n in d.vcpu if n.startswith("pf_")] + [n for n in expected if not n.startswith("pf_")]
    got = {n: d.vcpu[n] for n in names}
    want = {n: expected.get(n, 0) for n in names}
    assert got == want, f"vCPU stat deltas {got} != spec {want}; everything that moved: {d.moved()}"


# -- MMIO spte decoding, straight from §2.5.2 (shadow paging / NPT, host MAXPHYADDR 46, no L1TF) -----
MMIO_MARKER = (1 << 51) | 1               # shadow_mmio_value for MAXPHYADDR < 52 (§2.5.1)
SPTE_MMU_PRESENT = 1 << 11


def is_shadow_mmio_spte(spte: int) -> bool:
    return spte & MMIO_MARKER == MMIO_MARKER and not spte & SPTE_MMU_PRESENT


def mmio_spte_gen(spte: int) -> int:
    return ((spte & 0x7F8) >> 3) | ((spte & 0x7FF0_0000_0000_0000) >> 44)


def mmio_spte_gfn(spte: int, host_phys_bits: int = 46) -> int:
    lower_gfn_mask = ((1 << host_phys_bits) - 1) & ~0xFFF
    return (spte & lower_gfn_mask) >> 12


def mmio_spte_access(spte: int) -> int:
    return spte & 0x6                      # shadow_mmio_access_mask = ACC_WRITE | ACC_USER


# -- the guest ------------------------------------------------------------------------------------------
class Guest:
    """A VM with RAM in slot 0, one 4-level address space whose tables live in POOL, and vCPUs."""

    def __init__(self, mmu: str = "shadow", mmio_caching: str = "generation", *, vcpus: int = 1,
                 initial_generation: int = 0, address_spaces: int = 2, pool: int = POOL,
                 pool_end: int = POOL_END) -> None:
        self.vm = kvmmu.VM(mmu=mmu, mmio_caching=mmio_caching, initial_generation=initial_generation,
                           address_spaces=address_spaces)
        self.vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=RAM_SIZE, flags=0)
        self.pt = self.new_address_space(pool, pool_end)
        self.pt.map(WARM, WARM)
        self.pt.map(MMIO_GVA, MMIO_GPA)
        self.mmio_reads: dict[int, int] = {}          # what the VMM answers to a read exit, by gpa
        self.vm.mmio_handler = self.mmio_handler
        self.vcpus = [self.vm.create_vcpu() for _ in range(vcpus)]
        for v in self.vcpus:
            v.set_sregs(cr3=self.pt.cr3, **LONG_MODE)
            # The first entry flushes the guest TLB (kvm_vcpu_reset); take that out of every delta.
            assert v.access(WARM, 8, "read").fault is None

    @property
    def vcpu(self) -> kvmmu.Vcpu:
        return self.vcpus[0]

    def new_address_space(self, pool: int, pool_end: int) -> GuestPageTables:
        write, read = vm_writer(self.vm)
        pt = GuestPageTables("4level", write, read, pool=pool, pool_end=pool_end)
        pt.map_range(POOL, POOL, POOL_END - POOL)          # the tables are reachable by the guest
        return pt

    def guest_writes_tables(self, pt: GuestPageTables | None = None, vcpu: kvmmu.Vcpu | None = None) -> None:
        """From now on the builder writes the tables as the guest kernel does: through the vCPU."""
        pt = pt or self.pt
        pt.write, pt.read = vcpu_writer(vcpu or self.vcpu)

    def mmio_handler(self, exit_: kvmmu.MmioExit) -> int | None:
        return self.mmio_reads.get(exit_.phys_addr)

    def snap(self, vcpu: kvmmu.Vcpu | None = None) -> Snapshot:
        return Snapshot(self.vm, vcpu or self.vcpu)

    # observation of KVM's own tables (what the CPU would walk)
    def leaf_spte(self, gva: int, vcpu: kvmmu.Vcpu | None = None) -> tuple[int, int]:
        """(level, spte) of the last entry the shadow walk for gva reaches."""
        walked = list((vcpu or self.vcpu).mmu.shadow_walk(gva))
        assert walked, "no shadow root loaded"
        return walked[-1]

    def gpte(self, gva: int, level: int, pt: GuestPageTables | None = None) -> int:
        pt = pt or self.pt
        return int.from_bytes(self.vm.read_phys(pt.entry_addr(gva, level, create=False), 8), "little")

    def shadow_pages(self) -> list:
        """KVM's shadow pages that are not obsolete (observation only)."""
        kvm = self.vm.mmu
        return [sp for sp in kvm.active_mmu_pages if not kvm.is_obsolete(sp)]

    def audit(self) -> None:
        self.vm.audit()


__all__ = [
    "DATA", "GEN_MASK", "IN_PROGRESS", "LONG_MODE", "MMIO_GPA", "MMIO_GVA", "PAGE", "PAGE_MASK", "POOL",
    "POOL_END", "RAM_SIZE", "RWU", "SPTE_MMU_PRESENT", "WARM", "Delta", "Guest", "MiB", "Snapshot", "assert_pf",
    "is_shadow_mmio_spte", "mmio_spte_access", "mmio_spte_gen", "mmio_spte_gfn",
]
