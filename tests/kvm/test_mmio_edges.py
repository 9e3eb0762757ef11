"""MMIO under shadow paging: the per-vCPU cache, sync of MMIO sptes, prefetch, huge guest pages, CR0.WP.

Spec: §2.6 (per-vCPU cache), §3.5.5 (CR0.WP=0), §3.6 (fetch, direct pages for guest huge pages,
prefetch), §3.9 (MMIO sptes: 4 KiB only, sync_mmio_spte, prefetch never creates them), §3.12
(emulator: cache hit needs the permission check to pass, else a full walk), §5.9 (page 0).
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR4_PAE
from kvmmu.guest.pagetables import RW, US, A, D, GuestPageTables, P, vm_writer
from tests.kvm.harness import (
    DATA,
    GEN_MASK,
    LONG_MODE,
    MMIO_GPA,
    MMIO_GVA,
    PAGE,
    RWU,
    SPTE_MMU_PRESENT,
    WARM,
    Guest,
    MiB,
    Snapshot,
    assert_pf,
    is_shadow_mmio_spte,
    mmio_spte_access,
    mmio_spte_gen,
    mmio_spte_gfn,
)

G = MMIO_GPA
V = MMIO_GVA


# -- the per-vCPU cache -----------------------------------------------------------------------------------
def test_gva_page_zero_is_never_cached_but_spte_serves(guest: Guest) -> None:
    """§2.6 / §5.9 / invariant 6: mmio_gva 0 means "empty", so MMIO at gva page 0 never hits the cache;
    it is still handled through the MMIO spte: the second access moves no pf_* counter."""
    g = guest
    g.pt.map(0, G)
    g.vcpu.access(0x10, 4, "read")
    assert g.vcpu.mmio_gva == 0
    s = g.snap()
    r = g.vcpu.access(0x10, 4, "read")
    d = s.delta()
    assert [e.phys_addr for e in r.mmio_exit_records] == [G + 0x10]
    assert_pf(d, mmio_exits=1)
    assert d.model["mmio_fastpath"] == 1
    g.audit()


def test_vcpus_share_mmio_sptes_not_caches() -> None:
    """§2.6: the cache is per vCPU, the MMIO spte is in shared shadow pages: a second vCPU on the same CR3
    takes the fast path through the spte on its first access (no pf_*) and then has its own cache."""
    g = Guest(vcpus=2)
    g.vcpus[0].access(V + 0x10, 4, "read")
    v1 = g.vcpus[1]
    assert v1.mmio_gva == 0
    s = g.snap(v1)
    r = v1.access(V + 0x10, 4, "read")
    assert len(r.mmio_exit_records) == 1
    assert_pf(s.delta(), mmio_exits=1)
    assert (v1.mmio_gva, v1.mmio_gfn) == (V, G >> 12)
    g.audit()


def test_write_after_read_uses_full_walk_in_emulator(guest: Guest) -> None:
    """§3.12 step 3: the gva cache serves the emulator only if permission_fault(mmio_access) passes; a
    read cached access U only (clean gpte), so a later store walks the guest tables (which sets D) - still
    no pf_* counter moves and the store exits as an MMIO write."""
    g = guest
    g.vcpu.access(V, 4, "read")
    assert g.vcpu.mmio_access == 4
    s = g.snap()
    r = g.vcpu.access(V + 8, 4, "write", 0x77)
    d = s.delta()
    assert [(e.phys_addr, e.is_write) for e in r.mmio_exit_records] == [(G + 8, True)]
    assert_pf(d, mmio_exits=1)
    assert d.model["guest_walks"] == 1
    assert g.gpte(V, 1) & D
    g.audit()


def test_user_access_through_user_mapping_hits_cache(guest: Guest) -> None:
    """§3.12 step 3: a user access allowed by the cached access (U set) is a cache hit: no guest walk."""
    g = guest
    g.vcpu.access(V, 4, "read", cpl=3)
    s = g.snap()
    g.vcpu.access(V, 4, "read", cpl=3)
    d = s.delta()
    assert d.model["guest_walks"] == 0
    assert_pf(d, mmio_exits=1)
    g.audit()


# -- MMIO sptes are 4 KiB leaves, also under guest huge pages ----------------------------------------------
def test_guest_2m_page_over_mmio_gets_4k_mmio_sptes(guest: Guest) -> None:
    """§2.5.2 / §3.9: MMIO sptes are always 4 KiB leaves, also when the guest maps the range with a 2 MiB
    page; each 4 KiB page of it gets its own MMIO spte on first touch (pf_mmio_spte_created+1 each)."""
    g = guest
    big = 0x8000_0000
    g.pt.map(big, G & ~(2 * MiB - 1), page_size=2 * MiB)
    base = G & ~(2 * MiB - 1)
    for i in (0, 5):
        s = g.snap()
        r = g.vcpu.access(big + i * PAGE, 4, "read")
        assert [e.phys_addr for e in r.mmio_exit_records] == [base + i * PAGE]
        assert_pf(s.delta(), pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
        level, spte = g.leaf_spte(big + i * PAGE)
        assert level == 1 and is_shadow_mmio_spte(spte) and mmio_spte_gfn(spte) == (base >> 12) + i
    assert g.vm.stats["pages_2m"] == 0 and g.vm.stats["pages_4k"] == 1      # only WARM is RAM
    g.audit()


def test_guest_2m_ram_page_is_mapped_with_4k_sptes(guest: Guest) -> None:
    """§3.6 FNAME(fetch): a guest large page is shadowed by direct pages down to the goal level; the host
    backs guest RAM with 4 KiB pages, so leaves are 4 KiB (pages_2m unchanged).  The direct page's
    neighbours are prefetched (§2.1 PTE_PREFETCH_NUM = 8): the aligned group of 8 is mapped at once."""
    g = guest
    g.pt.map(0x8000_0000, 4 * MiB, page_size=2 * MiB)
    g.vm.write_phys(4 * MiB + 3 * PAGE, b"hugepage")
    s = g.snap()
    r = g.vcpu.access(0x8000_0000 + 3 * PAGE, 8, "read")
    d = s.delta()
    assert r.value == int.from_bytes(b"hugepage", "little")
    assert_pf(d, pf_taken=1, pf_fixed=1)
    assert (d.vm["pages_4k"], d.vm["pages_2m"]) == (8, 0)
    s = g.snap()
    g.vcpu.access(0x8000_0000 + 7 * PAGE, 8, "read")
    assert_pf(s.delta())
    g.audit()


# -- sync of MMIO sptes (unsync level-1 tables) -----------------------------------------------------------
def _unsync_v_table(g: Guest) -> int:
    """Make V's guest page table writable-by-the-guest (unsync) and return the gpa of V's PTE."""
    pte = g.pt.entry_addr(V, 1, create=False)
    assert g.vcpu.access(pte, 8, "read").fault is None
    return pte


def test_mmio_pte_repointed_to_ram_old_translation_until_invlpg(guest: Guest) -> None:
    """TLB semantics + §3.9 sync_mmio_spte: the guest repoints V from G to RAM in its (unsync) table;
    before INVLPG the old MMIO translation is still used; after INVLPG the MMIO spte (different gfn now)
    is cleared and the next access maps RAM (pf_taken+1, pf_fixed+1, no exit)."""
    g = guest
    g.vcpu.access(V, 4, "read")
    pte = _unsync_v_table(g)
    g.vm.write_phys(DATA, b"now RAM!")
    g.vcpu.access(pte, 8, "write", DATA | RWU | A)
    assert g.vm.stats["mmu_unsync"] >= 1
    assert [e.phys_addr for e in g.vcpu.access(V, 4, "read").mmio_exit_records] == [G]
    g.vcpu.invlpg(V)
    assert not is_shadow_mmio_spte(g.leaf_spte(V)[1])
    s = g.snap()
    r = g.vcpu.access(V, 8, "read")
    assert r.mmio_exit_records == [] and r.value == int.from_bytes(b"now RAM!", "little")
    assert_pf(s.delta(), pf_taken=1, pf_fixed=1)
    g.audit()


def test_sync_recreates_same_gfn_mmio_spte_with_new_access_and_current_gen(guest: Guest) -> None:
    """§3.9 sync_mmio_spte: same gfn -> the MMIO spte is re-created with the new access and the *current*
    generation; the next access is then a fast-path hit (no pf_*)."""
    g = guest
    g.vcpu.access(V, 4, "read")
    old_gen = mmio_spte_gen(g.leaf_spte(V)[1])
    pte = _unsync_v_table(g)
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    g.vcpu.access(pte, 8, "write", G | P | RW | US | A | D)       # now dirty: access W|U
    g.vcpu.invlpg(V)
    spte = g.leaf_spte(V)[1]
    assert is_shadow_mmio_spte(spte) and mmio_spte_gfn(spte) == G >> 12
    assert mmio_spte_access(spte) == 6
    assert mmio_spte_gen(spte) == g.vm.memslots.generation(0) & GEN_MASK != old_gen
    s = g.snap()
    g.vcpu.access(V, 4, "read")
    assert_pf(s.delta(), mmio_exits=1)
    g.audit()


def test_unsync_page_zapped_by_delete_drops_gauge(guest: Guest) -> None:
    """§4: mmu_unsync is a gauge of pages currently unsync; zapping everything (DELETE) brings it to 0."""
    g = guest
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    g.pt.map(DATA, DATA)
    g.vcpu.access(DATA, 8, "read")
    pte = g.pt.entry_addr(DATA, 1, create=False)
    g.vcpu.access(pte, 8, "read")
    g.vcpu.access(pte, 8, "write", DATA | RWU)
    assert g.vm.stats["mmu_unsync"] == 1
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=0)
    assert g.vm.stats["mmu_unsync"] == 0
    g.vcpu.access(WARM, 8, "read")
    g.audit()


# -- prefetch ------------------------------------------------------------------------------------------------
def test_prefetch_never_creates_mmio_sptes(guest: Guest) -> None:
    """§3.9: "Prefetch never creates MMIO sptes (needs a slot)": an accessed neighbour gpte pointing at an
    unbacked gpa stays unmapped; touching it later is a full fault that creates the MMIO spte."""
    g = guest
    g.pt.map(DATA, DATA)
    g.pt.map(DATA + PAGE, G, flags=RWU | A)
    s = g.snap()
    g.vcpu.access(DATA, 8, "read")
    assert s.delta().vcpu["pf_mmio_spte_created"] == 0
    level, spte = g.leaf_spte(DATA + PAGE)
    assert level == 1 and not is_shadow_mmio_spte(spte) and not spte & SPTE_MMU_PRESENT
    s = g.snap()
    g.vcpu.access(DATA + PAGE, 4, "read")
    assert_pf(s.delta(), pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    g.audit()


def test_prefetch_maps_accessed_ram_neighbour(guest: Guest) -> None:
    """§3.6: after mapping a 4 KiB gpte, neighbouring gptes are prefetched: an accessed RAM neighbour is
    mapped too (pages_4k+2), so touching it later takes no fault."""
    g = guest
    g.pt.map(DATA, DATA)
    g.pt.map(DATA + PAGE, DATA + 9 * PAGE, flags=RWU | A)
    s = g.snap()
    g.vcpu.access(DATA, 8, "read")
    assert s.delta().vm["pages_4k"] == 2
    s = g.snap()
    g.vcpu.access(DATA + PAGE, 8, "read")
    assert_pf(s.delta())
    g.audit()


# -- CR0.WP = 0 (§3.5.5) ----------------------------------------------------------------------------------
def _wp0_guest() -> Guest:
    g = Guest()
    g.vcpu.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE, cr3=g.pt.cr3, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
    g.vcpu.access(WARM, 8, "read")
    return g


def test_wp0_supervisor_write_to_readonly_user_page_succeeds() -> None:
    """§3.5.5: with CR0.WP=0 a supervisor write to a U=1,W=0 page is allowed (spte built W=1,U=0); a user
    read afterwards is allowed too (the spte is rebuilt U=1,W=0) - no guest #PF either time."""
    g = _wp0_guest()
    g.pt.map(DATA, DATA, flags=P | US)
    r = g.vcpu.access(DATA, 4, "write", 0x600D, cpl=0)
    assert r.fault is None and g.vm.read_phys(DATA, 4) == (0x600D).to_bytes(4, "little")
    assert g.vcpu.access(DATA, 4, "read", cpl=3).fault is None
    assert g.vcpu.access(DATA, 4, "write", 0xBAD, cpl=3).fault is not None     # user writes still fault
    g.audit()


def test_wp0_not_applied_to_mmio_cached_access() -> None:
    """§3.5.5: "Not applied to MMIO gfns (the cached access must be the guest's real one)": a supervisor
    write through a read-only user gpte to MMIO exits as a write and caches/encodes access U only."""
    g = _wp0_guest()
    g.pt.map(V, G, flags=P | US)
    r = g.vcpu.access(V, 4, "write", 0x1, cpl=0)
    assert r.fault is None and [(e.phys_addr, e.is_write) for e in r.mmio_exit_records] == [(G, True)]
    assert g.vcpu.mmio_access == 4
    assert mmio_spte_access(g.leaf_spte(V)[1]) == 4
    g.audit()


# -- an MMIO spte replacing a present RAM spte -----------------------------------------------------------------
@pytest.mark.parametrize("how", ["guest store into its unsync table", "VMM write (invisible to KVM)"])
def test_mmio_spte_over_present_ram_spte_drops_it(guest: Guest, how: str) -> None:
    """Invariant 1 + §4: the guest repoints a read-mapped RAM page to an unbacked gpa without INVLPG; its
    next store faults on the read-only spte, KVM's walk sees the new gpte and installs an MMIO spte in
    that slot.  The RAM leaf it replaces is no longer a present leaf: pages_4k drops by 1 and the gfn
    loses its rmap entry (MMIO sptes have none), so the audit stays clean."""
    g = guest
    g.pt.map(DATA, DATA)
    g.vcpu.access(DATA, 8, "read")                        # clean gpte: the spte is read-only
    pte = g.pt.entry_addr(DATA, 1, create=False)
    if how.startswith("guest"):
        g.vcpu.access(pte, 8, "read")
        g.vcpu.access(pte, 8, "write", G | RWU | A)         # the table goes unsync; no INVLPG
    else:
        g.vm.write_phys(pte, (G | RWU | A).to_bytes(8, "little"))
    s = g.snap()
    r = g.vcpu.access(DATA, 4, "write", 0x55)
    d = s.delta()
    assert [(e.phys_addr, e.is_write) for e in r.mmio_exit_records] == [(G, True)]
    assert_pf(d, pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    assert d.vm["pages_4k"] == -1
    g.audit()


# -- guest page tables in a read-only slot (§5.6) ---------------------------------------------------------------
def test_tables_in_readonly_slot_get_no_ad_updates() -> None:
    """§5.6 / §3.5.1 step 9: A/D updates to guest page tables living in read-only slots are skipped; the
    walk still succeeds and the access completes (pf_fixed+1), with every gpte unchanged."""
    vm = kvmmu.VM(mmu="shadow", mmio_caching="generation")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=32 * MiB)
    vm.set_user_memory_region(slot=1, guest_phys_addr=64 * MiB, memory_size=MiB, flags=kvmmu.KVM_MEM_READONLY)
    w, r = vm_writer(vm)
    pt = GuestPageTables("4level", w, r, pool=64 * MiB, pool_end=65 * MiB)
    pt.map(DATA, DATA)
    before = [pt.read(pt.entry_addr(DATA, lvl, create=False), 8) for lvl in (4, 3, 2, 1)]
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr3=pt.cr3, **LONG_MODE)
    s = Snapshot(vm, vcpu)
    res = vcpu.access(DATA, 4, "write", 9)
    assert res.fault is None and res.mmio_exit_records == []
    assert_pf(s.delta(), pf_taken=1, pf_fixed=1)
    assert [pt.read(pt.entry_addr(DATA, lvl, create=False), 8) for lvl in (4, 3, 2, 1)] == before
    assert vm.read_phys(DATA, 4) == (9).to_bytes(4, "little")
    vm.audit()


# -- guest paging off: a direct shadow MMU -------------------------------------------------------------------
def test_nonpaging_guest_mmio_first_and_fast() -> None:
    """§2.3 nonpaging_page_fault (direct, not TDP) + A.1/A.2: with guest paging off the fault address is
    the gpa; the first access creates the MMIO spte (pf_taken+1, pf_mmio_spte_created+1, pf_emulate+1),
    the second is a fast-path hit (no pf_*)."""
    vm = kvmmu.VM(mmu="shadow", mmio_caching="generation")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=32 * MiB)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PE)
    vcpu.access(WARM, 4, "read")
    s = Snapshot(vm, vcpu)
    assert [e.phys_addr for e in vcpu.access(G, 4, "read").mmio_exit_records] == [G]
    assert_pf(s.delta(), pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    s = Snapshot(vm, vcpu)
    assert [e.phys_addr for e in vcpu.access(G, 4, "read").mmio_exit_records] == [G]
    assert_pf(s.delta(), mmio_exits=1)
    vm.audit()


# -- a straddling access whose second page faults -------------------------------------------------------------
def test_straddle_into_unmapped_page_injects_pf_and_no_exit(guest: Guest) -> None:
    """§3.12 step 3 / §5.13: each fragment is translated by the emulator; when the second page's walk
    fails, the #PF (W, not present: 0x2; CR2 = start of the second page) is injected and no MMIO exit
    reaches userspace (the instruction did not complete)."""
    g = guest
    gva = V + 0x20000                           # V + 0x20000 -> G, the next page is not mapped
    g.pt.map(gva, G)
    s = g.snap()
    r = g.vcpu.access(gva + 0xFFC, 8, "write", 0x1122334455667788)
    assert r.fault is not None and (r.fault.vector, r.fault.error_code, r.fault.cr2) == (14, 0x2, gva + PAGE)
    assert r.mmio_exit_records == []
    d = s.delta()
    assert (d.vcpu["pf_guest"], d.vcpu["mmio_exits"]) == (1, 0)
    g.audit()


# -- the role separates shadow pages built under different CR0.WP -------------------------------------------
def test_cr0_wp_change_unloads_roots_and_uses_other_shadow_pages(guest: Guest) -> None:
    """§2.2 (cr0_wp is part of the role) + §3.11 (kvm_mmu_unload clears the cache): after the guest
    clears CR0.WP the MMIO cache is empty and the MMIO spte built under the old role is not in the new
    tables, so the next access creates one again (pf_taken+1, pf_mmio_spte_created+1)."""
    g = guest
    g.vcpu.access(V, 4, "read")
    g.vcpu.write_cr0(X86_CR0_PG | X86_CR0_PE)              # WP off: a role change
    assert g.vcpu.mmio_gva == 0
    s = g.snap()
    g.vcpu.access(V, 4, "read")
    d = s.delta()
    assert_pf(d, pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    assert d.vm["mmu_cache_miss"] >= 1
    g.audit()


def test_mmio_exit_records_and_the_deprecated_exits_alias() -> None:
    """An MMIO read's AccessResult lists its KVM_EXIT_MMIO (one, counted by KVM's mmio_exits); the
    old name `exits` still reads the same list, with a DeprecationWarning."""
    vm = kvmmu.VM(mmu="shadow", mmio_caching="generation")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=32 * MiB)
    w, r = vm_writer(vm)
    pt = GuestPageTables("4level", w, r, pool=0x100000)
    pt.map(DATA, 0xFEE00000)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr3=pt.cr3, **LONG_MODE)
    vm.mmio_handler = lambda ex: 0x1234
    mmio_exits = vcpu.stats["mmio_exits"]
    res = vcpu.access(DATA, 4, "read")
    assert [(e.phys_addr, e.len, e.is_write) for e in res.mmio_exit_records] == [(0xFEE00000, 4, False)]
    assert vcpu.stats["mmio_exits"] - mmio_exits == 1 and res.value == 0x1234
    with pytest.warns(DeprecationWarning, match="mmio_exit_records"):
        assert res.exits is res.mmio_exit_records
