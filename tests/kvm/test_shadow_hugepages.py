"""Huge sptes under shadow paging: the shadow MMU honours the host mapping level.

Expected values come from KVM's code (arch/x86/kvm/mmu/):
- paging_tmpl.h, FNAME(page_fault): `fault->max_level = walker.level` (the guest's page size);
  FNAME(fetch) calls kvm_mmu_hugepage_adjust after linking the indirect levels and installs the
  leaf at fault->goal_level (mmu_set_spte with the frame's first gfn; pages_2m / pages_1g count it);
- mmu.c, kvm_mmu_hugepage_adjust / __kvm_mmu_max_mapping_level: no huge page for a dirty-logged
  slot, for a frame whose lpage_info has disallow_lpage, or above host_pfn_mapping_level;
- kvm_main.c/x86.c, kvm_alloc_memslot_metadata: disallow_lpage for a frame the slot does not wholly
  hold, or every frame when the slot's gfn and host address are not congruent;
- mmu.c, account_shadowed: a shadowed guest table's gfn disallows huge pages over it
  (kvm_mmu_gfn_disallow_lpage) and every spte mapping it, huge ones included, is write-protected
  (kvm_mmu_slot_gfn_write_protect from PG_LEVEL_4K up); __link_shadow_page drops a huge spte that
  a page table replaces (drop_large_spte);
- mmu.c, nonpaging_page_fault: `fault->max_level = PG_LEVEL_2M` (the tables are PAE format).
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.guest.pagetables import RW, US, A, D, GuestPageTables, P, vm_writer
from kvmmu.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES

LONG_MODE = dict(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
POOL, POOL_END = 0x10_0000, 0x14_0000          # the guest's tables: in the first 2 MiB frame
GVA = 0x4000_0000
FRAME = 0x40_0000                               # a 2 MiB frame with no guest table in it
PS = 1 << 7
RWUAD = P | RW | US | A | D


def setup(host_level: int, ram: int = 16 << 20, slot_flags: int = 0, **kw: object) -> tuple:
    vm = kvmmu.VM(mmu="shadow", host_hugepage_level=host_level, **kw)  # type: ignore[arg-type]
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=ram, flags=slot_flags)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=POOL, pool_end=POOL_END)
    pt.map_range(POOL, POOL, POOL_END - POOL, P | RW | A | D)
    v = vm.create_vcpu()
    return vm, pt, v


def leaf(v: kvmmu.Vcpu, gva: int) -> tuple[int, int]:
    return list(v.mmu.shadow_walk(gva))[-1]


def pages(vm: kvmmu.VM) -> tuple[int, int, int]:
    return vm.stats["pages_4k"], vm.stats["pages_2m"], vm.stats["pages_1g"]


@pytest.mark.parametrize("host_level,expected", [(1, (1, 0, 0)), (2, (0, 1, 0)), (3, (0, 1, 0))])
def test_guest_2m_page_gets_a_huge_spte_when_the_host_page_is_huge(host_level: int, expected: tuple) -> None:
    vm, pt, v = setup(host_level)
    pt.map(GVA, FRAME, 2 << 20, RWUAD)
    vm.write_phys(FRAME + 0x12_3000, (0x55).to_bytes(8, "little"))
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    before = pages(vm)
    assert v.access(GVA, 8, "read").fault is None
    got = tuple(a - b for a, b in zip(pages(vm), before, strict=True))
    # host level 1: a direct shadow page maps the faulting 4 KiB piece (and prefetches neighbours)
    assert got[1:] == expected[1:] and (got[0] >= 1) == (expected[0] == 1)
    level, spte = leaf(v, GVA + 0x12_3000)
    if host_level == 1:
        assert level == 1 or not spte & 1
    else:
        assert level == 2 and spte & PS
        taken = v.stats["pf_taken"]
        assert v.access(GVA + 0x12_3000, 8, "read").value == 0x55
        assert v.stats["pf_taken"] == taken, "the huge spte maps the whole guest page"
    vm.audit()


def test_guest_4k_pages_stay_4k_on_huge_host_pages() -> None:
    """walker.level is 1 for a 4 KiB guest page: max_level 1, whatever the host."""
    vm, pt, v = setup(3)
    pt.map(GVA, FRAME)
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert v.access(GVA, 8, "read").fault is None
    assert pages(vm)[1:] == (0, 0)
    vm.audit()


def test_guest_1g_page_gets_a_1g_spte_only_on_1g_host_pages() -> None:
    for host_level, want in ((3, (0, 0, 1)), (2, (0, 1, 0))):
        vm, pt, v = setup(host_level, ram=2 << 30)
        pt.map(0x80_0000_0000, 1 << 30, 1 << 30, RWUAD)
        v.set_sregs(cr3=pt.cr3, **LONG_MODE)
        assert v.access(0x80_0000_0000 + 0x1234_5000, 8, "write", 1).fault is None
        assert pages(vm) == want, host_level
        assert vm.read_phys((1 << 30) + 0x1234_5000, 1) == b"\x01"
        vm.audit()


def test_frame_not_wholly_in_the_slot_is_mapped_4k() -> None:
    """disallow_lpage for the slot's last, partial frame: [0x400000, 0x600000) ends past a 5 MiB slot."""
    vm, pt, v = setup(2, ram=5 << 20)
    pt.map(GVA, FRAME, 2 << 20, RWUAD)
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert v.access(GVA, 8, "read").fault is None
    assert pages(vm)[1] == 0 and leaf(v, GVA)[0] == 1
    vm.audit()


def test_slot_whose_host_address_is_not_congruent_is_mapped_4k() -> None:
    """gfn and hva differ modulo 2 MiB: kvm_alloc_memslot_metadata disallows every huge frame."""
    vm = kvmmu.VM(mmu="shadow", host_hugepage_level=2)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    hva = vm.memslots.slot(0, 0).userspace_addr
    vm.set_user_memory_region(slot=1, guest_phys_addr=32 << 20, memory_size=4 << 20, userspace_addr=hva + 0x1000)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=POOL, pool_end=POOL_END)
    pt.map_range(POOL, POOL, POOL_END - POOL, P | RW | A | D)
    pt.map(GVA, 32 << 20, 2 << 20, RWUAD)
    v = vm.create_vcpu()
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert v.access(GVA, 8, "read").fault is None
    assert pages(vm)[1] == 0
    vm.audit()


def test_dirty_logged_slot_is_mapped_4k() -> None:
    vm, pt, v = setup(2, slot_flags=KVM_MEM_LOG_DIRTY_PAGES)
    pt.map(GVA, FRAME, 2 << 20, RWUAD)
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert v.access(GVA, 8, "write", 1).fault is None
    assert pages(vm)[1] == 0
    vm.audit()


def test_frame_holding_a_shadowed_guest_table_is_mapped_4k() -> None:
    """The guest's 2 MiB page over its own page tables (a kernel's direct map): the tables' gfns
    are shadowed, so their frame is disallowed and mapped 4 KiB at a time."""
    vm, pt, v = setup(2)
    pt.map(GVA, 0, 2 << 20, RWUAD)                 # gpa [0, 2 MiB) holds POOL
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert v.access(GVA + 0x8000, 8, "read").fault is None
    assert pages(vm)[1] == 0 and leaf(v, GVA + 0x8000)[0] == 1
    vm.audit()


def test_huge_spte_is_write_protected_then_split_when_its_frame_gets_a_guest_table() -> None:
    vm, pt, v = setup(2)
    pt.map(GVA, FRAME, 2 << 20, RWUAD)
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert v.access(GVA, 8, "write", 1).fault is None
    level, spte = leaf(v, GVA)
    assert level == 2 and spte & 2, "a writable huge spte"
    # The guest now uses a page of FRAME as a page table for another address, and touches it.
    table = FRAME + 0x10_0000
    vm.write_phys(table, (0x60_0000 | P | RW | US).to_bytes(8, "little"))
    pd = pt.entry_addr(0x8000_0000, 2)
    vm.write_phys(pd, (table | P | RW | US | A).to_bytes(8, "little"))
    assert v.access(0x8000_0000, 8, "read").fault is None
    level, spte = leaf(v, GVA)
    assert level == 2 and spte & PS and not spte & 2, "account_shadowed write-protects the huge spte"
    assert v.access(GVA + 0x10_0008, 8, "read").fault is None, "reads still go through the huge spte"
    before = pages(vm)
    assert v.access(GVA + 0x20_00, 8, "write", 2).fault is None
    assert leaf(v, GVA + 0x2000)[0] == 1, "the write fault replaces the huge spte by a table"
    assert pages(vm)[1] == before[1] - 1
    vm.audit()
    # The frame's other pages are mapped again 4 KiB at a time.
    assert v.access(GVA + 0x10_0000, 8, "read").value == 0x60_0000 | P | RW | US | A


def test_nonpaging_maps_at_most_2m() -> None:
    vm = kvmmu.VM(mmu="shadow", host_hugepage_level=3)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=2 << 30)
    v = vm.create_vcpu()
    v.set_sregs(cr0=X86_CR0_PE, cr4=0, efer=0)
    assert v.access(0x4012_3000, 4, "write", 1).fault is None
    assert pages(vm) == (0, 1, 0)
    vm.audit()


def test_vmm_mappings_on_huge_host_pages_are_huge_aligned() -> None:
    """Linux places an anonymous mapping of at least 2 MiB on a 2 MiB boundary when it can be backed
    by transparent huge pages (thp_get_unmapped_area; the real backend's 8 MiB slot here lands
    2 MiB-aligned), so a slot created after an odd-sized one still gets huge sptes."""
    vm = kvmmu.VM(mmu="shadow", host_hugepage_level=2)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=5 << 20)
    vm.set_user_memory_region(slot=1, guest_phys_addr=32 << 20, memory_size=4 << 20)
    assert vm.memslots.slot(1, 0).userspace_addr % (2 << 20) == 0
    pt = GuestPageTables("4level", *vm_writer(vm), pool=POOL, pool_end=POOL_END)
    pt.map_range(POOL, POOL, POOL_END - POOL, P | RW | A | D)
    pt.map(GVA, 32 << 20, 2 << 20, RWUAD)
    v = vm.create_vcpu()
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert v.access(GVA, 8, "read").fault is None
    assert pages(vm)[1] == 1
    vm.audit()
