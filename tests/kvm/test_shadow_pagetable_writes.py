"""Shadow paging: the guest writing its own page tables through its vCPU, INVLPG and CR3 reloads.

Spec: §2.2 (indirect pages are "accounted": the guest table gfn is write-protected / write-tracked),
§2.3 (prev_roots), §3.6 step 3 (write to a write-tracked gfn -> EMULATE), §3.11 (kvm_mmu_track_write,
cache clearing on CR3 / TLB flush / INVLPG), §4 (mmu_pte_write, mmu_unsync, mmu_cache_miss).
"""

from __future__ import annotations

import pytest

from kvmmu.guest.pagetables import A, D
from tests.kvm.harness import DATA, MMIO_GVA, PAGE, RWU, SPTE_MMU_PRESENT, Guest, assert_pf

OLD, NEW = 0x0101010101010101, 0x0202020202020202
DATA2 = DATA + 0x10_0000        # another page in the same 2 MiB region: same guest page table


def _two_pages(g: Guest) -> None:
    g.vm.write_phys(DATA, OLD.to_bytes(8, "little"))
    g.vm.write_phys(DATA2, NEW.to_bytes(8, "little"))


# -- upper-level tables: write-tracked, emulated -------------------------------------------------------
def _upper_level_setup(g: Guest) -> tuple[int, int]:
    """Shadow the PD covering DATA, and let the guest map the PD page (read) before writing it."""
    _two_pages(g)
    g.pt.map(DATA, DATA)
    assert g.vcpu.access(DATA, 8, "read").value == OLD
    pde = g.pt.entry_addr(DATA, 2, create=False)
    assert g.vcpu.access(pde, 8, "read").fault is None       # the PD page itself is identity-mapped
    new_pt = g.pt.alloc_table()                              # a second page table, not shadowed yet
    g.vm.write_phys(new_pt + 8 * ((DATA >> 12) & 511), (DATA2 | RWU).to_bytes(8, "little"))
    return pde, new_pt


def test_write_to_upper_level_table_is_emulated(guest: Guest) -> None:
    """§3.6 step 3 + §3.11 + §4: a guest store into a shadowed upper-level table (write-tracked) faults,
    the handler returns EMULATE (pf_taken+1, pf_emulate+1) and the emulated write is tracked
    (mmu_pte_write+1); it is RAM, so there is no MMIO exit and the store reaches memory."""
    g = guest
    pde, new_pt = _upper_level_setup(g)
    s = g.snap()
    r = g.vcpu.access(pde, 8, "write", new_pt | RWU)
    d = s.delta()
    assert r.fault is None and r.mmio_exit_records == []
    assert_pf(d, pf_taken=1, pf_emulate=1, mmio_exits=0)
    assert d.vm["mmu_pte_write"] == 1
    assert d.vm["mmu_unsync"] == 0, "upper-level tables never go unsync"
    assert int.from_bytes(g.vm.read_phys(pde, 8), "little") == new_pt | RWU
    g.audit()


def test_upper_level_table_write_zaps_the_covering_spte(guest: Guest) -> None:
    """§3.11 kvm_mmu_track_write zaps the sptes that shadow the written gpte, so the next access
    through the rewritten PDE uses the guest's new page table."""
    g = guest
    pde, new_pt = _upper_level_setup(g)
    g.vcpu.access(pde, 8, "write", new_pt | RWU)
    level, spte = g.leaf_spte(DATA)
    assert level == 2 and not spte & SPTE_MMU_PRESENT
    r = g.vcpu.access(DATA, 8, "read")
    assert r.value == NEW
    g.audit()


def test_upper_level_tables_are_not_unsynced(guest: Guest) -> None:
    """§2.2/§3.6: upper-level guest tables are write-tracked, so they never go unsync (unlike level 1):
    every store to one is emulated (each store: pf_emulate+1, mmu_pte_write+1)."""
    g = guest
    pde, new_pt = _upper_level_setup(g)
    for i in range(2):
        s = g.snap()
        g.vcpu.access(pde, 8, "write", new_pt | RWU)
        d = s.delta()
        assert (d.vcpu["pf_emulate"], d.vm["mmu_pte_write"], d.vm["mmu_unsync"]) == (1, 1, 0), f"store {i}"
    g.audit()


# -- level-1 tables: unsync, resync on INVLPG / CR3 reload ---------------------------------------------------
def _leaf_setup(g: Guest) -> int:
    _two_pages(g)
    g.pt.map(DATA, DATA)
    assert g.vcpu.access(DATA, 8, "read").value == OLD       # shadows DATA's level-1 table
    pte = g.pt.entry_addr(DATA, 1, create=False)
    assert g.vcpu.access(pte, 8, "read").fault is None
    return pte


def test_write_to_level1_table_unsyncs_it(guest: Guest) -> None:
    """§2.4.1/§3.6 + §4: a store into a shadowed level-1 table is not emulated: KVM lets the page go
    unsync (mmu_unsync gauge +1), maps the table page writable (pf_taken+1, pf_fixed+1) and the store
    goes to memory; no mmu_pte_write."""
    g = guest
    pte = _leaf_setup(g)
    s = g.snap()
    r = g.vcpu.access(pte, 8, "write", DATA2 | RWU)
    d = s.delta()
    assert r.fault is None and r.mmio_exit_records == []
    assert_pf(d, pf_taken=1, pf_fixed=1)
    assert d.vm["mmu_unsync"] == 1
    assert d.vm["mmu_pte_write"] == 0
    assert int.from_bytes(g.vm.read_phys(pte, 8), "little") == DATA2 | RWU
    g.audit()


def test_unsync_page_keeps_old_translation_until_invlpg(guest: Guest) -> None:
    """TLB semantics under unsync: until the guest invalidates, the old translation is still used."""
    g = guest
    pte = _leaf_setup(g)
    g.vcpu.access(pte, 8, "write", DATA2 | RWU)
    s = g.snap()
    r = g.vcpu.access(DATA, 8, "read")
    assert r.value == OLD
    assert_pf(s.delta(), exits=0)
    g.audit()


def test_invlpg_resyncs_the_unsync_spte(guest: Guest) -> None:
    """§3.11 + §4: INVLPG (counted in `invlpg`) resyncs the spte of an unsync page for that address,
    after which the guest's new PTE is used."""
    g = guest
    pte = _leaf_setup(g)
    g.vcpu.access(pte, 8, "write", DATA2 | RWU)
    s = g.snap()
    g.vcpu.invlpg(DATA)
    r = g.vcpu.access(DATA, 8, "read")
    assert r.value == NEW
    assert s.delta().vcpu["invlpg"] == 1
    g.audit()


def test_invlpg_of_another_address_keeps_old_translation(guest: Guest) -> None:
    """INVLPG invalidates one address: a different page of the unsync table keeps its old spte."""
    g = guest
    pte = _leaf_setup(g)
    g.vcpu.access(pte, 8, "write", DATA2 | RWU)
    g.vcpu.invlpg(DATA + 5 * PAGE)
    assert g.vcpu.access(DATA, 8, "read").value == OLD
    g.audit()


def test_cr3_reload_syncs_unsync_pages(guest: Guest) -> None:
    """§3.11: a CR3 write (guest TLB flush) syncs the unsync pages under the root: the gauge
    mmu_unsync drops back and the new PTE is used."""
    g = guest
    pte = _leaf_setup(g)
    g.vcpu.access(pte, 8, "write", DATA2 | RWU)
    assert g.vm.stats["mmu_unsync"] == 1
    g.vcpu.write_cr3(g.pt.cr3)
    r = g.vcpu.access(DATA, 8, "read")
    assert r.value == NEW
    assert g.vm.stats["mmu_unsync"] == 0
    g.audit()


def test_unsync_zero_pte_then_invlpg_unmaps(guest: Guest) -> None:
    """§3.9/§3.11: after the guest clears a PTE in an unsync table and invalidates it, the access
    faults into the guest as not-present (#PF, error code 0)."""
    g = guest
    pte = _leaf_setup(g)
    g.vcpu.access(pte, 8, "write", 0)
    g.vcpu.invlpg(DATA)
    s = g.snap()
    r = g.vcpu.access(DATA, 8, "read")
    assert r.fault is not None and (r.fault.vector, r.fault.error_code, r.fault.cr2) == (14, 0, DATA)
    assert_pf(s.delta(), pf_taken=1, pf_guest=1)
    g.audit()


# -- CR3 switch between two address spaces --------------------------------------------------------------
def test_cr3_switch_back_reuses_cached_root(guest: Guest) -> None:
    """§2.3 prev_roots + §3.11 kvm_mmu_new_pgd: switching back to a recent CR3 reuses its cached root;
    no shadow page is allocated (no mmu_cache_miss) and the mapped page does not fault again."""
    g = guest
    _two_pages(g)
    g.pt.map(DATA, DATA)
    pt2 = g.new_address_space(0x20_0000, 0x30_0000)
    pt2.map(DATA, DATA2)
    assert g.vcpu.access(DATA, 8, "read").value == OLD
    g.vcpu.write_cr3(pt2.cr3)
    assert g.vcpu.access(DATA, 8, "read").value == NEW
    s = g.snap()
    g.vcpu.write_cr3(g.pt.cr3)
    r = g.vcpu.access(DATA, 8, "read")
    d = s.delta()
    assert r.value == OLD
    assert d.vm["mmu_cache_miss"] == 0
    assert_pf(d)
    g.audit()


def test_cr3_switch_to_new_address_space_builds_new_root(guest: Guest) -> None:
    """§2.2: a CR3 never seen before has no shadow page: the new root and the tables under it are
    hash misses (mmu_cache_miss grows), and each table level is shadowed once."""
    g = guest
    pt2 = g.new_address_space(0x20_0000, 0x30_0000)
    pt2.map(DATA, DATA2)
    g.vcpu.write_cr3(pt2.cr3)
    s = g.snap()
    g.vcpu.access(DATA, 8, "read")
    assert s.delta().vm["mmu_cache_miss"] == 4      # PML4 (root), PDPT, PD, PT of the new space
    g.audit()


def test_cr3_switch_alternating_keeps_both_roots(guest: Guest) -> None:
    """§2.3: with up to 3 cached roots, ping-ponging between two address spaces never re-creates a root
    and never re-faults already-mapped pages."""
    g = guest
    _two_pages(g)
    g.pt.map(DATA, DATA)
    pt2 = g.new_address_space(0x20_0000, 0x30_0000)
    pt2.map(DATA, DATA2)
    g.vcpu.access(DATA, 8, "read")
    g.vcpu.write_cr3(pt2.cr3)
    g.vcpu.access(DATA, 8, "read")
    s = g.snap()
    for cr3, want in [(g.pt.cr3, OLD), (pt2.cr3, NEW)] * 3:
        g.vcpu.write_cr3(cr3)
        assert g.vcpu.access(DATA, 8, "read").value == want
    d = s.delta()
    assert d.vm["mmu_cache_miss"] == 0
    assert_pf(d)
    g.audit()


def test_guest_written_tables_keep_ad_bits_consistent(guest: Guest) -> None:
    """§3.5.1 step 9: the A/D bits KVM's walker sets are visible in guest memory even for tables the
    guest itself wrote through the vCPU."""
    g = guest
    g.guest_writes_tables()
    g.pt.map(DATA + 7 * PAGE, DATA)              # written through the vCPU (the PT may be new)
    g.vcpu.access(DATA + 7 * PAGE, 4, "write", 5)
    assert g.gpte(DATA + 7 * PAGE, 1) & (A | D) == A | D
    assert g.vm.read_phys(DATA, 4) == (5).to_bytes(4, "little")
    g.audit()


# -- kvm_mmu_track_write details: mmu_pde_zapped, write flooding, misaligned writes --------------------------
def _pd_of_v(g: Guest) -> int:
    """Shadow the PD that maps MMIO_GVA (a PD not on the path of the table pool's own mapping) and map
    that PD's page for the guest; returns the PD's gpa."""
    g.vcpu.access(MMIO_GVA, 4, "read")
    pd = g.pt.entry_addr(MMIO_GVA, 2, create=False) & ~0xFFF
    assert g.vcpu.access(pd, 8, "read").fault is None
    return pd


@pytest.mark.parametrize("value,zapped", [(0x30_0000 | RWU, 1), (0, 0)], ids=["nonzero gentry", "zero gentry"])
def test_pde_write_counts_mmu_pde_zapped(guest: Guest, value: int, zapped: int) -> None:
    """§4 mmu_pde_zapped: "non-leaf gptes written while a gentry existed": an emulated store of a
    non-zero entry into a shadowed upper-level table counts one; storing 0 counts none."""
    g = guest
    pd = _pd_of_v(g)
    s = g.snap()
    g.vcpu.access(pd + 8 * 300, 8, "write", value)
    d = s.delta()
    assert (d.vm["mmu_pte_write"], d.vm["mmu_pde_zapped"]) == (1, zapped)
    g.audit()


def test_third_write_to_upper_table_is_write_flooding(guest: Guest) -> None:
    """§3.11 kvm_mmu_track_write: an upper-level shadow page written 3 times with no fault through it is
    "write-flooded" and zapped (mmu_flooded+1 on the third write only, mmu_shadow_zapped grows)."""
    g = guest
    pd = _pd_of_v(g)
    flooded = []
    for i in range(3):
        s = g.snap()
        g.vcpu.access(pd + 8 * (300 + i), 8, "write", 0)
        d = s.delta()
        flooded.append((d.vm["mmu_flooded"], d.vm["mmu_shadow_zapped"] > 0))
    assert flooded == [(0, False), (0, False), (1, True)]
    s = g.snap()
    g.vcpu.access(MMIO_GVA, 4, "read")
    d = s.delta()
    assert d.vcpu["pf_taken"] == 1 and d.vm["mmu_cache_miss"] >= 1, "the zapped PD must be shadowed again"
    g.audit()


MISALIGNED = {
    "8 bytes at a gpte": (0, 8, 0),
    "4 bytes at a gpte": (0, 4, 0),
    "1 byte at a gpte (allowed)": (0, 1, 0),
    "2 bytes at a gpte": (0, 2, 1),
    "8 bytes across two gptes": (4, 8, 1),
}


@pytest.mark.parametrize("offset,size,flooded", MISALIGNED.values(), ids=MISALIGNED.keys())
def test_misaligned_write_to_upper_table_zaps_it(guest: Guest, offset: int, size: int, flooded: int) -> None:
    """§3.11: an emulated write that is not a whole gpte (shorter than 4 bytes other than a single byte at
    a gpte's start, or spanning two gptes) zaps the page at once (mmu_flooded+1)."""
    g = guest
    pd = _pd_of_v(g)
    s = g.snap()
    g.vcpu.access(pd + 8 * 300 + offset, size, "write", 0)
    assert s.delta().vm["mmu_flooded"] == flooded
    g.audit()
