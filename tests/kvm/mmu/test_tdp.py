"""TDP (EPT / NPT): a direct MMU, faults arrive with a gpa, MMIO sptes by the flavour's encoding.

Expected values come from docs/spec/kvm-mmu.md (§2.4.2, §2.5, §3.1, §3.7, Appendix A) and the SDM.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.guest.pagetables import RW, US, GuestPageTables, P, vm_writer
from kvmmu.kvm.mmu.spte import SPTE_MMU_PRESENT_MASK

G = 0xD0000000          # no memslot here


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def _nonpaging_vm(flavour: str, policy: str = "generation") -> tuple[kvmmu.VM, kvmmu.Vcpu]:
    vm = kvmmu.VM(mmu=flavour, mmio_caching=policy)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    vm.mmio_handler = lambda e: 0x11223344
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PE)           # paging off: gva == gpa, the walk is EPT/NPT only
    vcpu.access(0x1000, 4, "read")           # first entry: flush requests, root load
    return vm, vcpu


@pytest.mark.parametrize("flavour", ["ept", "npt"])
def test_row1_first_read_of_unbacked_gpa(flavour: str) -> None:
    """Row 1: full path; pf_taken+1, pf_mmio_spte_created+1, pf_emulate+1, cache (gva 0, gfn G>>12),
    one KVM_EXIT_MMIO read of `len` bytes, mmio_exits+1."""
    vm, vcpu = _nonpaging_vm(flavour)
    before = vcpu.stats.snapshot()
    r = vcpu.access(G + 0x10, 4, "read")
    d = _delta(before, vcpu.stats.snapshot())
    assert {k: d.get(k, 0) for k in ("pf_taken", "pf_mmio_spte_created", "pf_emulate", "mmio_exits", "pf_fixed")} \
        == {"pf_taken": 1, "pf_mmio_spte_created": 1, "pf_emulate": 1, "mmio_exits": 1, "pf_fixed": 0}
    assert (vcpu.mmio_gva, vcpu.mmio_gfn) == (0, G >> 12)
    assert [(e.phys_addr, e.len, e.is_write) for e in r.mmio_exit_records] == [(G + 0x10, 4, False)]
    assert r.value == 0x11223344
    vm.audit()


@pytest.mark.parametrize("flavour", ["ept", "npt"])
def test_row2_second_access_takes_no_full_fault(flavour: str) -> None:
    """Row 2: the misconfig / RSVD exit is answered by the fast path (the gpa cache); no pf_* moves."""
    vm, vcpu = _nonpaging_vm(flavour)
    vcpu.access(G, 4, "read")
    before, cb = vcpu.stats.snapshot(), vcpu.counters.snapshot()
    r = vcpu.access(G + 8, 4, "write", 5)
    d = _delta(before, vcpu.stats.snapshot())
    assert not {k for k in d if k.startswith("pf_")}
    assert d["mmio_exits"] == 1 and d["exits"] == 1
    assert _delta(cb, vcpu.counters.snapshot()).get("mmio_cache_hits", 0) >= 1   # matched by gpa
    assert [(e.phys_addr, e.is_write, e.value) for e in r.mmio_exit_records] == [(G + 8, True, 5)]


def _leaf_spte(vm: kvmmu.VM, vcpu: kvmmu.Vcpu, gpa: int) -> int:
    return list(vcpu.mmu.shadow_walk(gpa))[-1][1]


def test_ept_mmio_spte_is_a_misconfiguration_without_access_bits() -> None:
    """EPT MMIO sptes: R/W/X = 110 (W+X without R), bit 63 clear, no access bits, not present."""
    vm, vcpu = _nonpaging_vm("ept")
    vcpu.access(G, 4, "read")
    spte = _leaf_spte(vm, vcpu, G)
    assert spte & 0x7 == 0b110 and not spte >> 63
    assert not spte & SPTE_MMU_PRESENT_MASK
    assert (spte >> 12) & ((1 << 40) - 1) == G >> 12     # bits 51:12 hold the gfn; the generation is elsewhere


def test_npt_mmio_spte_has_reserved_bit_51_and_write_user_access() -> None:
    """NPT MMIO sptes: P and reserved bit 51, cached access ACC_WRITE|ACC_USER (6) for a direct MMU."""
    vm, vcpu = _nonpaging_vm("npt")
    vcpu.access(G, 4, "read")
    spte = _leaf_spte(vm, vcpu, G)
    assert spte & 1 and spte >> 51 & 1 and spte & 0x6 == 0x6
    assert not spte & SPTE_MMU_PRESENT_MASK


def _paging_vm(flavour: str) -> tuple[kvmmu.VM, kvmmu.Vcpu, GuestPageTables]:
    vm = kvmmu.VM(mmu=flavour)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=0x100000)
    pt.map(0x400000, 0x200000, flags=P | RW | US)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr3=pt.cr3, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
    return vm, vcpu, pt


@pytest.mark.parametrize("flavour", ["ept", "npt"])
def test_guest_page_fault_goes_straight_to_the_guest(flavour: str) -> None:
    """With TDP the CPU delivers a guest #PF itself: no exit, pf_guest does not move (§3.1)."""
    vm, vcpu, pt = _paging_vm(flavour)
    vcpu.access(0x400000, 4, "read")
    before = vcpu.stats.snapshot()
    r = vcpu.access(0x600000, 4, "write", 1)
    assert r.fault is not None and r.fault.vector == 14 and r.fault.error_code == 0x2 and r.fault.cr2 == 0x600000
    assert _delta(before, vcpu.stats.snapshot()) == {}


def test_faulting_walk_sets_upper_a_bits_under_ept_but_not_under_shadow() -> None:
    """docs/spec/kvm-pvm-host.md §2: KVM's software walker (shadow) sets no A bit on a faulting walk; the CPU walking
    the guest tables itself (EPT) sets A on the upper levels it used."""
    results = {}
    for flavour in ("shadow", "ept"):
        vm, vcpu, pt = _paging_vm(flavour)
        pml4e = pt.entry_addr(0x401000, 4, create=False)
        leaf = pt.entry_addr(0x401000, 1, create=False)   # same tables as 0x400000; this PTE is empty
        r = vcpu.access(0x401000, 4, "read")
        assert r.fault is not None and r.fault.error_code == 0
        results[flavour] = (int.from_bytes(vm.read_phys(pml4e, 8), "little") & 0x20,
                            int.from_bytes(vm.read_phys(leaf, 8), "little"))
    assert results["shadow"] == (0, 0)
    assert results["ept"] == (0x20, 0)


def test_tdp_maps_2m_pages_when_slot_and_host_allow() -> None:
    """Huge pages where the memslot's alignment and the host backing allow (§3.7 hugepage adjust)."""
    vm = kvmmu.VM(mmu="ept", host_hugepage_level=2)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PE)
    before = vm.stats.snapshot()
    vcpu.access(0x345678, 4, "read")
    assert _delta(before, vm.stats.snapshot()).get("pages_2m") == 1
    vm.audit()


def test_dirty_logging_write_is_fixed_by_the_fast_path() -> None:
    """After KVM_GET_DIRTY_LOG write-protects a page, the next write is fixed locklessly (pf_fast)."""
    vm, vcpu = _nonpaging_vm("ept")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20, flags=kvmmu.KVM_MEM_LOG_DIRTY_PAGES)
    vcpu.access(0x5000, 8, "write", 1)
    assert 5 in vm.get_dirty_log(0)
    before = vcpu.stats.snapshot()
    vcpu.access(0x5000, 8, "write", 2)
    d = _delta(before, vcpu.stats.snapshot())
    assert d.get("pf_fast") == 1 and d.get("pf_taken") == 1 and d.get("pf_fixed") == 1
    assert vm.get_dirty_log(0) == {5}
    vm.audit()
