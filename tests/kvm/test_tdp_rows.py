"""Appendix A rows 1-4 under TDP (EPT and NPT), the form the table is written in.

The guest runs with paging off, so the address it issues is the gpa that the EPT violation /
misconfiguration or #NPF carries.  Spec: §2.5 (MMIO spte encodings), §3.2-3.4, §3.7, §3.8.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import X86_CR0_PE
from tests.kvm.harness import GEN_MASK, MMIO_GPA, MiB, Snapshot, assert_pf, mmio_spte_gen

G = MMIO_GPA
FLAVOURS = ("ept", "npt")


def _tdp_vm(mmu: str) -> tuple[kvmmu.VM, kvmmu.Vcpu]:
    vm = kvmmu.VM(mmu=mmu, mmio_caching="generation")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=32 * MiB)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PE)
    assert vcpu.access(0x1000, 8, "read").fault is None      # first entry (guest TLB flush) out of the way
    return vm, vcpu


def _leaf(vcpu: kvmmu.Vcpu, gpa: int) -> tuple[int, int]:
    return list(vcpu.mmu.shadow_walk(gpa))[-1]


@pytest.mark.parametrize("mmu", FLAVOURS)
def test_row1_first_read_of_unbacked_gpa(mmu: str) -> None:
    """A.1: TDP, first read of G: full path (pf_taken+1, pf_mmio_spte_created+1, pf_emulate+1), cache
    filled with gva 0 and gfn G>>12, one KVM_EXIT_MMIO read of `len` bytes, mmio_exits+1."""
    vm, vcpu = _tdp_vm(mmu)
    s = Snapshot(vm, vcpu)
    r = vcpu.access(G + 0x10, 4, "read")
    assert [(e.phys_addr, e.len, e.is_write) for e in r.mmio_exit_records] == [(G + 0x10, 4, False)]
    assert_pf(s.delta(), pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    assert (vcpu.mmio_gva, vcpu.mmio_gfn, vcpu.mmio_gen) == (0, G >> 12, vm.memslots.generation(0))
    vm.audit()


@pytest.mark.parametrize("mmu", FLAVOURS)
def test_row1_mmio_spte_encoding(mmu: str) -> None:
    """§2.5.1-2.5.2: EPT MMIO sptes are RWX=110 with bit 63 clear and no access bits; NPT ones carry
    bit 51 + P and access ACC_ALL & (W|U) = 6; both hold gfn and the generation slice, never bit 11."""
    vm, vcpu = _tdp_vm(mmu)
    vcpu.access(G, 4, "read")
    level, spte = _leaf(vcpu, G)
    assert level == 1 and not spte & (1 << 11)
    if mmu == "ept":
        assert spte & 0x8000_0000_0000_0007 == 0x6
    else:
        assert spte & ((1 << 51) | 0x7) == (1 << 51) | 0x7
    assert (spte & ((1 << 46) - 1) & ~0xFFF) >> 12 == G >> 12
    assert mmio_spte_gen(spte) == vm.memslots.generation(0) & GEN_MASK
    vm.audit()


@pytest.mark.parametrize("mmu", FLAVOURS)
def test_row2_second_access_no_pf_counters(mmu: str) -> None:
    """A.2: the second access is a RSVD #NPF / EPT misconfig resolved by the fast path: no pf_* counter
    changes, mmio_exits+1."""
    vm, vcpu = _tdp_vm(mmu)
    vcpu.access(G, 4, "read")
    s = Snapshot(vm, vcpu)
    r = vcpu.access(G, 4, "read")
    assert len(r.mmio_exit_records) == 1
    assert_pf(s.delta(), mmio_exits=1)
    vm.audit()


@pytest.mark.parametrize("mmu", FLAVOURS)
def test_row3_slot_over_g_maps_ram(mmu: str) -> None:
    """A.3: after CREATE over G the stale MMIO spte is INVALID and the full path maps RAM
    (pf_taken+1, pf_fixed+1), no exit."""
    vm, vcpu = _tdp_vm(mmu)
    vcpu.access(G, 4, "read")
    vm.set_user_memory_region(slot=1, guest_phys_addr=G, memory_size=MiB)
    vm.write_phys(G, b"\x2a\0\0\0")
    s = Snapshot(vm, vcpu)
    r = vcpu.access(G, 4, "read")
    assert r.mmio_exit_records == [] and r.value == 42
    assert_pf(s.delta(), pf_taken=1, pf_fixed=1)
    vm.audit()


@pytest.mark.parametrize("mmu", FLAVOURS)
def test_row4_unrelated_slot_recreates_spte(mmu: str) -> None:
    """A.4: after an unrelated CREATE the next access re-creates the MMIO spte with the new generation
    (pf_taken+1, pf_mmio_spte_created+1, pf_emulate+1)."""
    vm, vcpu = _tdp_vm(mmu)
    vcpu.access(G, 4, "read")
    vm.set_user_memory_region(slot=1, guest_phys_addr=0xE000_0000, memory_size=MiB)
    s = Snapshot(vm, vcpu)
    vcpu.access(G, 4, "read")
    assert_pf(s.delta(), pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    assert mmio_spte_gen(_leaf(vcpu, G)[1]) == vm.memslots.generation(0) & GEN_MASK
    vm.audit()
