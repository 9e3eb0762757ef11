"""MMIO sptes: encoding, when caching is possible at all, and a KVM bug reported loudly.

Golden values are the worked examples of docs/spec/kvm-mmu.md §2.5.2, computed there from the rules.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvmmu
from kvmmu.arch.bits import EFER_LME, X86_CR0_PE, X86_CR0_PG, X86_CR4_PAE
from kvmmu.guest.pagetables import GuestPageTables, vm_writer
from kvmmu.kvm.mmu.spte import (
    SPTE_MMU_PRESENT_MASK,
    MmioGenLayout,
    ept_masks,
    get_mmio_spte_access,
    get_mmio_spte_generation,
    get_mmio_spte_gfn,
    is_mmio_spte,
    is_shadow_present_pte,
    make_mmio_spte,
    shadow_masks,
)


def test_worked_example_non_ept() -> None:
    """phys bits 46, gfn 0xfee00, access 6, gen 0x12345 -> 0x12380000fee0022f."""
    assert make_mmio_spte(shadow_masks(46), 0xFEE00, 6, 0x12345) == 0x12380000FEE0022F


def test_worked_example_ept() -> None:
    """Same inputs on EPT (access masked to 0) -> 0x12300000fee0022e (bits 2:0 = 110, bit 63 clear)."""
    assert make_mmio_spte(ept_masks(46), 0xFEE00, 6, 0x12345) == 0x12300000FEE0022E


def test_generation_in_progress_flag_is_never_stored() -> None:
    """Invariant 3: only the low 19 bits of the generation are stored (bit 63 dropped)."""
    m = shadow_masks(46)
    spte = make_mmio_spte(m, 0x1234, 2, (1 << 63) | 0x7FFFF)
    assert get_mmio_spte_generation(m, spte) == 0x7FFFF


@given(gfn=st.integers(0, (1 << 34) - 1), access=st.integers(0, 7), gen=st.integers(0, (1 << 64) - 1),
       ept=st.booleans())
def test_encoding_round_trips(gfn: int, access: int, gen: int, ept: bool) -> None:
    """Invariant 4: decode(make(gfn, acc, gen)) == (gfn, acc & access_mask, gen & 0x7FFFF); never present."""
    m = ept_masks(46) if ept else shadow_masks(46)
    spte = make_mmio_spte(m, gfn, access, gen)
    assert is_mmio_spte(m, spte) and not is_shadow_present_pte(spte)
    assert get_mmio_spte_gfn(m, spte) == gfn
    assert get_mmio_spte_access(m, spte) == access & m.mmio_access_mask
    assert get_mmio_spte_generation(m, spte) == gen & 0x7FFFF


def test_generation_layout_is_a_parameter() -> None:
    """An 18-bit layout (bits 3-9 and 52-62, as proposed in 2025) round-trips with 18 bits."""
    layout = MmioGenLayout(low_start=3, low_end=9, high_start=52, high_end=62)
    m = shadow_masks(46, gen=layout)
    spte = make_mmio_spte(m, 0xABCDE, 6, 0x3FFFF)
    assert layout.bits == 18 and get_mmio_spte_generation(m, spte) == 0x3FFFF
    assert not spte & (1 << 10)


def _vm(**kw: object) -> tuple[kvmmu.VM, kvmmu.Vcpu]:
    vm = kvmmu.VM(**kw)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=1 << 20)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PE)
    return vm, vcpu


def test_host_maxphyaddr_52_disables_caching_for_shadow_paging() -> None:
    """No reserved PA bit exists at MAXPHYADDR 52: every MMIO access takes the full path (§5.4)."""
    vm, vcpu = _vm(mmu="shadow", host=kvmmu.Host(maxphyaddr=52))
    for _ in range(3):
        vcpu.access(0xD0000000, 4, "read")
    assert vcpu.stats["pf_mmio_spte_created"] == 0
    assert vcpu.stats["pf_emulate"] == 3 and vcpu.stats["pf_taken"] == 3
    vm.audit()


def test_ept_keeps_caching_at_maxphyaddr_52() -> None:
    """EPT's misconfiguration value needs no reserved PA bit, so caching stays on (§5.4)."""
    vm, vcpu = _vm(mmu="ept", host=kvmmu.Host(maxphyaddr=52))
    for _ in range(3):
        vcpu.access(0xD0000000, 4, "read")
    assert vcpu.stats["pf_mmio_spte_created"] == 1 and vcpu.stats["pf_emulate"] == 1


def test_gfn_beyond_max_gfn_is_emulated_without_an_spte() -> None:
    """A gfn too large to encode is emulated, no MMIO spte (kvm_handle_noslot_fault, §3.8)."""
    vm = kvmmu.VM(mmu="ept", host=kvmmu.Host(maxphyaddr=39), guest_maxphyaddr=46)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=1 << 20)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=0x10000)
    pt.map(0x400000, 1 << 40)             # a gpa above the host's 39 physical address bits
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE, cr3=pt.cr3, cr4=X86_CR4_PAE, efer=EFER_LME)
    vcpu.access(0x400000, 4, "read")
    vcpu.access(0x400000, 4, "read")
    assert vcpu.stats["pf_mmio_spte_created"] == 0 and vcpu.stats["pf_emulate"] == 2


def test_reserved_bit_in_a_present_spte_is_a_kvm_bug() -> None:
    """§3.3 / §5.7: a reserved bit on a spte that is not MMIO is a KVM bug, reported loudly."""
    vm, vcpu = _vm(mmu="ept")
    vcpu.access(0x5000, 4, "read")
    level, sptep = list(vcpu.mmu.shadow_walk_ptrs(0x5000))[-1]
    spte = vm.host.mem.read(sptep, 8)
    assert spte & SPTE_MMU_PRESENT_MASK
    vm.host.mem.write(sptep, 8, spte | (1 << 50))       # corrupt KVM's own table (bit 50 > MAXPHYADDR)
    vcpu.cpu.flush()
    with pytest.raises(kvmmu.KvmBug, match="reserved bits"):
        vcpu.access(0x5000, 4, "read")


def test_zap_policy_stores_no_generation() -> None:
    """The 2011 design: one mask (PA bits MAXPHYADDR..62 plus P), then access and gfn, no generation."""
    vm, vcpu = _vm(mmu="shadow", mmio_caching="zap", initial_generation=0x12344)
    vcpu.access(0xD0000000, 4, "read")
    spte = list(vcpu.mmu.shadow_walk(0xD0000000))[-1][1]
    mask_2011 = (((1 << (62 - 46 + 1)) - 1) << 46) | 1
    assert spte & 0x7F8 == 0                          # no generation in bits 3-10
    assert spte & mask_2011 == mask_2011 and (spte & ~mask_2011) >> 12 == 0xD0000
