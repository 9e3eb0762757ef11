"""Appendix A scenarios 2-13 of docs/spec/kvm-mmu.md in their shadow-paging form.

Row 1 ("TDP, first read of an unbacked gpa") is in test_tdp_rows.py.  Under shadow paging its analogue
is the first access to a gva the guest maps to an unbacked gpa, which is row 7's setup; every "after 1"
row starts from `_first_mmio_access`.  Deltas are per vCPU (§4); "no pf_* counter changes" is checked
on every pf_* stat at once by `assert_pf`.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu import GuestFault
from kvmmu.guest.pagetables import RW, US, A, D, P
from tests.kvm.harness import (
    DATA,
    GEN_MASK,
    IN_PROGRESS,
    MMIO_GPA,
    MMIO_GVA,
    PAGE,
    PAGE_MASK,
    RWU,
    SPTE_MMU_PRESENT,
    WARM,
    Guest,
    MiB,
    assert_pf,
    is_shadow_mmio_spte,
    mmio_spte_access,
    mmio_spte_gen,
    mmio_spte_gfn,
)

G = MMIO_GPA
V = MMIO_GVA


def _exits(r: kvmmu.AccessResult) -> list[tuple[int, int, bool, bytes]]:
    return [(e.phys_addr, e.len, e.is_write, e.data) for e in r.mmio_exit_records]


def _first_mmio_access(g: Guest, offset: int = 0x10, size: int = 4) -> kvmmu.AccessResult:
    r = g.vcpu.access(V + offset, size, "read")
    assert r.fault is None and len(r.mmio_exit_records) == 1
    return r


# -- row 2 ------------------------------------------------------------------------------------------
def test_row2_second_access_takes_the_fast_path(guest: Guest) -> None:
    """A.2: after 1, a second access to G faults with RSVD and is resolved by the fast path (cache hit)
    and emulated: no pf_* counter changes, mmio_exits+1 (one VM exit)."""
    g = guest
    g.mmio_reads[G + 0x10] = 0x5A5A5A5A
    _first_mmio_access(g)
    s = g.snap()
    r = g.vcpu.access(V + 0x10, 4, "read")
    assert _exits(r) == [(G + 0x10, 4, False, (0x5A5A5A5A).to_bytes(4, "little"))]
    assert r.value == 0x5A5A5A5A
    d = s.delta()
    assert_pf(d, mmio_exits=1, exits=1)
    assert d.vcpu["insn_emulation"] == 1
    g.audit()


def test_row2_fast_path_skips_guest_walk_and_memslot_lookup(guest: Guest) -> None:
    """§1 core idea / §3.3: the fast path walks neither the guest tables nor the memslots."""
    g = guest
    _first_mmio_access(g)
    s = g.snap()
    g.vcpu.access(V + 0x10, 4, "read")
    d = s.delta()
    assert (d.model["guest_walks"], d.model["memslot_lookups"]) == (0, 0), d.moved()
    g.audit()


def test_row2_repeated_accesses_each_exit_once(guest: Guest) -> None:
    """A.2 repeated: every further access is one exit to userspace and no pf_* movement."""
    g = guest
    _first_mmio_access(g)
    s = g.snap()
    for i in range(5):
        assert len(g.vcpu.access(V + 8 * i, 8, "read").mmio_exit_records) == 1
    assert_pf(s.delta(), mmio_exits=5, exits=5)
    g.audit()


# -- row 3 ------------------------------------------------------------------------------------------
def test_row3_slot_created_over_g_maps_ram(guest: Guest) -> None:
    """A.3: CREATE a slot covering G: generation += nr_as; the next access finds the MMIO spte stale
    (INVALID) and the full path maps RAM: pf_taken+1, pf_fixed+1, no exit."""
    g = guest
    _first_mmio_access(g)
    gen = g.vm.memslots.generation(0)
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=G, memory_size=MiB)
    g.vm.write_phys(G + 0x10, b"RAMNOW!!")
    assert g.vm.memslots.generation(0) == gen + 2
    s = g.snap()
    r = g.vcpu.access(V + 0x10, 8, "read")
    d = s.delta()
    assert r.mmio_exit_records == [] and r.value == int.from_bytes(b"RAMNOW!!", "little")
    assert_pf(d, pf_taken=1, pf_fixed=1, mmio_exits=0)
    assert d.model["mmio_fastpath_invalid"] == 1, "the stale spte must be seen by the fast path (INVALID)"
    g.audit()


def test_row3_writes_now_reach_ram(guest: Guest) -> None:
    """A.3 for a store: once backed, G is RAM for writes too; the value lands in the new slot."""
    g = guest
    _first_mmio_access(g)
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=G, memory_size=MiB)
    r = g.vcpu.access(V + 0x20, 4, "write", 0x13572468)
    assert r.mmio_exit_records == []
    assert g.vm.read_phys(G + 0x20, 4) == (0x13572468).to_bytes(4, "little")
    g.audit()


# -- row 4 ------------------------------------------------------------------------------------------
def test_row4_unrelated_slot_recreates_mmio_spte(guest: Guest) -> None:
    """A.4: CREATE an unrelated slot; the next access to G is stale -> INVALID -> full path, which
    re-creates the MMIO spte with the new generation (pf_taken+1, pf_mmio_spte_created+1, pf_emulate+1)."""
    g = guest
    _first_mmio_access(g)
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    s = g.snap()
    r = g.vcpu.access(V + 0x10, 4, "read")
    d = s.delta()
    assert [(e.phys_addr, e.len) for e in r.mmio_exit_records] == [(G + 0x10, 4)]
    assert_pf(d, pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    level, spte = g.leaf_spte(V)
    assert level == 1 and is_shadow_mmio_spte(spte)
    assert mmio_spte_gen(spte) == g.vm.memslots.generation(0) & GEN_MASK
    g.audit()


def test_row4_access_after_recreation_is_fast_again(guest: Guest) -> None:
    """A.4 then A.2: once re-created with the current generation, the spte serves the fast path."""
    g = guest
    _first_mmio_access(g)
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    g.vcpu.access(V + 0x10, 4, "read")
    s = g.snap()
    g.vcpu.access(V + 0x10, 4, "read")
    assert_pf(s.delta(), mmio_exits=1)
    g.audit()


def test_row4_cache_refilled_with_new_generation(guest: Guest) -> None:
    """§2.6: the per-vCPU cache compares the full generation; after the update it is refilled with the
    new one (mmio_gen == memslots(as 0).generation)."""
    g = guest
    _first_mmio_access(g)
    old = g.vcpu.mmio_gen
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    g.vcpu.access(V + 0x10, 4, "read")
    assert g.vcpu.mmio_gen == g.vm.memslots.generation(0) == old + 2
    g.audit()


# -- row 5: generation wrap ------------------------------------------------------------------------------
def _populate(g: Guest) -> None:
    g.pt.map(DATA, DATA)
    g.vcpu.access(DATA, 8, "read")
    _first_mmio_access(g)


def test_row5_wrap_zaps_every_shadow_page() -> None:
    """A.5 + §3.11: with as-0 generation at 2^19 - nr_as, one more memslot update makes the 19-bit slice
    0: kvm_mmu_zap_all_fast drops every shadow page (MMIO or not); no leaf spte remains."""
    g = Guest(initial_generation=(1 << 19) - 4)        # creating slot 0 brings it to 2^19 - 2
    assert g.vm.memslots.generation(0) == (1 << 19) - 2
    _populate(g)
    before = g.shadow_pages()
    s = g.snap()
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    d = s.delta()
    assert g.vm.memslots.generation(0) == 1 << 19, "the memslot generation itself is 64-bit and never wraps"
    assert d.vm["mmu_shadow_zapped"] >= len(before)
    assert not set(g.shadow_pages()) & set(before)
    assert g.vm.stats["pages_4k"] == 0
    g.vcpu.access(WARM, 8, "read")
    g.audit()


def test_row5_after_wrap_roots_are_reloaded_and_pages_refault() -> None:
    """A.5: all roots are obsolete, so the vCPU reloads its root (mmu_cache_miss) and a page it had
    mapped faults again (pf_taken+1, pf_fixed+1)."""
    g = Guest(initial_generation=(1 << 19) - 4)
    _populate(g)
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    s = g.snap()
    g.vcpu.access(DATA, 8, "read")
    d = s.delta()
    assert_pf(d, pf_taken=1, pf_fixed=1)
    assert d.vm["mmu_cache_miss"] >= 4, "a new root and the tables under it must be allocated"
    g.audit()


def test_row5_all_vcpus_reload_roots() -> None:
    """A.5: "all vCPUs reload roots".  Two vCPUs on different CR3s (guest tables, hence shadow pages,
    not shared): after the wrap each one's next access to a page it had mapped faults again, new root."""
    g = Guest(initial_generation=(1 << 19) - 4, vcpus=2)
    pt2 = g.new_address_space(0x20_0000, 0x30_0000)
    pt2.map(WARM, WARM)
    g.vcpus[1].write_cr3(pt2.cr3)
    g.pt.map(DATA, DATA)
    pt2.map(DATA, DATA + PAGE)
    for v in g.vcpus:
        v.access(DATA, 8, "read")
    old_roots = [v.mmu.root_sp for v in g.vcpus]
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    for v, old in zip(g.vcpus, old_roots, strict=True):
        s = g.snap(v)
        v.access(DATA, 8, "read")
        assert_pf(s.delta(), pf_taken=1, pf_fixed=1)
        assert v.mmu.root_sp is not old and v.mmu.root_sp in g.shadow_pages()
    g.audit()


def test_row5_vcpus_sharing_a_root_share_the_rebuilt_tables() -> None:
    """§2.2: shadow pages are found by (gfn, role), so after the wrap a second vCPU on the same CR3 finds
    the tables the first one rebuilt: it reloads its root but takes no page fault."""
    g = Guest(initial_generation=(1 << 19) - 4, vcpus=2)
    g.pt.map(DATA, DATA)
    for v in g.vcpus:
        v.access(DATA, 8, "read")
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    g.vcpus[0].access(DATA, 8, "read")
    s = g.snap(g.vcpus[1])
    g.vcpus[1].access(DATA, 8, "read")
    assert_pf(s.delta())
    assert g.vcpus[1].mmu.root_sp is g.vcpus[0].mmu.root_sp
    g.audit()


def test_row5_update_before_the_wrap_zaps_nothing() -> None:
    """§3.11: only a slice of 0 zaps; going from 2^19 - 4 to 2^19 - 2 keeps every shadow page."""
    g = Guest(initial_generation=(1 << 19) - 6)
    _populate(g)
    s = g.snap()
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    assert g.vm.memslots.generation(0) == (1 << 19) - 2
    assert s.delta().vm["mmu_shadow_zapped"] == 0
    g.audit()


def test_row5_wrap_in_address_space_1_zaps_everything() -> None:
    """A.5 with VM(initial_generation=2^19 - 2) and 2 address spaces: address space 1 sits at
    2^19 - 1; one update of an SMM slot takes it to 2^19 + 1, whose slice with the address-space
    modifier stripped is 0 -> zap all (§3.11)."""
    g = Guest(initial_generation=(1 << 19) - 2)       # slot 0's creation already wrapped as 0 (nothing to zap)
    assert g.vm.memslots.generation(1) == (1 << 19) - 1
    _populate(g)
    before = g.shadow_pages()
    s = g.snap()
    g.vm.set_user_memory_region(slot=(1 << 16) | 2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    assert g.vm.memslots.generation(1) == (1 << 19) + 1
    assert s.delta().vm["mmu_shadow_zapped"] >= len(before)
    assert not set(g.shadow_pages()) & set(before)
    g.vcpu.access(WARM, 8, "read")
    g.audit()


def test_row5_mmio_spte_with_generation_slice_zero_works() -> None:
    """§2.5.2 / §3.3: after the wrap the current slice is 0; an MMIO spte built now stores gen 0 and
    the generation check accepts it (the next access is fast, no pf_*)."""
    g = Guest(initial_generation=(1 << 19) - 4)
    _populate(g)
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    s = g.snap()
    _first_mmio_access(g)
    assert_pf(s.delta(), pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    assert mmio_spte_gen(g.leaf_spte(V)[1]) == 0
    g.vcpu.write_cr3(g.pt.cr3)                  # drop the gva cache: the spte alone must serve
    s = g.snap()
    _first_mmio_access(g)
    assert_pf(s.delta(), mmio_exits=1)
    g.audit()


# -- row 6 ------------------------------------------------------------------------------------------
def test_row6_readonly_slot_write_is_emulated_mmio_write() -> None:
    """A.6: read-only slot at G: a write is pf_emulate+1 and a KVM_EXIT_MMIO write; no MMIO spte and no
    cache entry; reads of G are normal RAM mappings (pf_fixed, no exit)."""
    g = Guest()
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=G, memory_size=MiB, flags=kvmmu.KVM_MEM_READONLY)
    g.vm.write_phys(G, b"firmware")
    s = g.snap()
    r = g.vcpu.access(V, 8, "write", 0x0102030405060708)
    assert _exits(r) == [(G, 8, True, (0x0102030405060708).to_bytes(8, "little"))]
    assert_pf(s.delta(), pf_taken=1, pf_emulate=1, mmio_exits=1)
    assert (g.vcpu.mmio_gva, g.vcpu.mmio_gfn) == (0, 0)
    assert not is_shadow_mmio_spte(g.leaf_spte(V)[1])
    s = g.snap()
    r = g.vcpu.access(V, 8, "read")
    assert r.mmio_exit_records == [] and r.value == int.from_bytes(b"firmware", "little")
    assert_pf(s.delta(), pf_taken=1, pf_fixed=1)
    g.audit()


# -- row 7 ------------------------------------------------------------------------------------------
# (leaf gpte flags, access, CPL, expected cached access = walker.pte_access & (W|U))
ROW7 = {
    "clean RW user page, read (W dropped by protect_clean_gpte)": (RWU, "read", 0, 4),
    "clean RW user page, write": (RWU, "write", 0, 6),
    "dirty RW user page, read": (RWU | D, "read", 0, 6),
    "RW supervisor page, write": (P | RW, "write", 0, 2),
    "read-only user page, user read": (P | US, "read", 3, 4),
    "read-only supervisor page, read": (P, "read", 0, 0),
}


@pytest.mark.parametrize("flags,kind,cpl,access", ROW7.values(), ids=ROW7.keys())
def test_row7_mmio_spte_and_cache_from_guest_walk(guest: Guest, flags: int, kind: str, cpl: int,
                                                  access: int) -> None:
    """A.7: the guest maps V -> G (no slot); accessing V walks the guest tables (A set), installs an MMIO
    spte with access = pte_access & (W|U) and the current generation, and caches
    mmio_gva = V & PAGE_MASK, mmio_gfn = G >> 12 (pf_taken+1, pf_mmio_spte_created+1, pf_emulate+1)."""
    g = guest
    gva = V + 7 * PAGE
    g.pt.map(gva, G, flags=flags)
    s = g.snap()
    r = g.vcpu.access(gva + 0x44, 4, kind, 0x11 if kind == "write" else None, cpl=cpl)
    d = s.delta()
    assert r.fault is None
    assert [(e.phys_addr, e.len, e.is_write) for e in r.mmio_exit_records] == [(G + 0x44, 4, kind == "write")]
    assert_pf(d, pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    assert d.vm["pages_4k"] == 0, "MMIO sptes are not counted in pages_4k (invariant 1)"
    v = g.vcpu
    gen = g.vm.memslots.generation(0)
    assert (v.mmio_gva, v.mmio_gfn, v.mmio_access, v.mmio_gen) == (gva & PAGE_MASK, G >> 12, access, gen)
    level, spte = g.leaf_spte(gva)
    assert level == 1 and is_shadow_mmio_spte(spte) and not spte & SPTE_MMU_PRESENT
    assert (mmio_spte_gfn(spte), mmio_spte_access(spte), mmio_spte_gen(spte)) == (G >> 12, access, gen & GEN_MASK)
    for lvl in (4, 3, 2, 1):
        assert g.gpte(gva, lvl) & A, f"A not set at level {lvl}"
    assert bool(g.gpte(gva, 1) & D) == (kind == "write" or bool(flags & D))
    g.audit()


def test_row7_traces_mark_mmio_spte(guest: Guest) -> None:
    """§2.5.2 step 6 / §4 tracepoints: installing the MMIO spte emits mark_mmio_spte; the second access
    emits handle_mmio_page_fault or vcpu_match_mmio (fast path), not kvm_mmu_pagetable_walk."""
    g = guest
    g.vm.trace.enable()
    _first_mmio_access(g)
    names = g.vm.trace.names()
    assert "mark_mmio_spte" in names and "kvm_mmu_pagetable_walk" in names
    g.vm.trace.clear()
    _first_mmio_access(g)
    names = g.vm.trace.names()
    assert "kvm_mmu_pagetable_walk" not in names and "mark_mmio_spte" not in names
    assert "vcpu_match_mmio" in names or "handle_mmio_page_fault" in names
    g.audit()


# -- row 8 ------------------------------------------------------------------------------------------
def test_row8_cr3_reload_clears_gva_cache_spte_survives(guest: Guest) -> None:
    """A.8: after a CR3 write the cache's mmio_gva is cleared (gfn kept) but the MMIO spte survives:
    the next access is served by the spte (no pf_* counter moves)."""
    g = guest
    _first_mmio_access(g)
    g.vcpu.write_cr3(g.pt.cr3)
    s = g.snap()
    r = g.vcpu.access(V + 0x10, 4, "read")
    d = s.delta()
    assert len(r.mmio_exit_records) == 1
    assert_pf(d, mmio_exits=1)
    assert d.model["mmio_fastpath"] == 1
    g.audit()


def test_row8_cr3_write_zeroes_only_mmio_gva(guest: Guest) -> None:
    """§2.6 / §3.11: a same-value CR3 write requests KVM_REQ_MMU_SYNC; kvm_mmu_sync_roots (on the next
    entry) clears the cache, and clearing only zeroes mmio_gva: gfn and gen are untouched."""
    g = guest
    _first_mmio_access(g)
    gfn, gen = g.vcpu.mmio_gfn, g.vcpu.mmio_gen
    g.vcpu.write_cr3(g.pt.cr3)
    g.vcpu.access(WARM, 8, "read")              # the flush/sync requests are handled on the next entry
    assert (g.vcpu.mmio_gva, g.vcpu.mmio_gfn, g.vcpu.mmio_gen) == (0, gfn, gen)
    g.audit()


def test_row8_invlpg_of_v_clears_cache_spte_survives(guest: Guest) -> None:
    """A.8 / §3.11: INVLPG V clears that gva from the cache; the MMIO spte (its page is not unsync) is
    kept and serves the next access (no pf_*)."""
    g = guest
    _first_mmio_access(g)
    g.vcpu.invlpg(V + 0x123)
    assert g.vcpu.mmio_gva == 0
    s = g.snap()
    g.vcpu.access(V + 0x10, 4, "read")
    assert_pf(s.delta(), mmio_exits=1)
    g.audit()


def test_row8_invlpg_of_another_page_keeps_cache(guest: Guest) -> None:
    """§2.6 vcpu_clear_mmio_info(gva): only a matching page (or MMIO_GVA_ANY) clears the cache."""
    g = guest
    _first_mmio_access(g)
    g.vcpu.invlpg(V + 3 * PAGE)
    assert g.vcpu.mmio_gva == V
    g.audit()


def test_row8_switch_away_and_back_spte_survives_in_cached_root(guest: Guest) -> None:
    """A.8 + §2.3: switching CR3 to another address space and back clears the cache, but the root (and
    the MMIO spte under it) is reused from prev_roots: no pf_* on the access after switching back."""
    g = guest
    _first_mmio_access(g)
    pt2 = g.new_address_space(0x20_0000, 0x30_0000)
    pt2.map(WARM, WARM)
    g.vcpu.write_cr3(pt2.cr3)
    g.vcpu.access(WARM, 8, "read")
    assert g.vcpu.mmio_gva == 0
    g.vcpu.write_cr3(g.pt.cr3)
    s = g.snap()
    g.vcpu.access(V + 0x10, 4, "read")
    assert_pf(s.delta(), mmio_exits=1)
    g.audit()


# -- row 9 ------------------------------------------------------------------------------------------
def _row9(g: Guest) -> tuple[kvmmu.AccessResult, object]:
    gva = V + 9 * PAGE
    g.pt.map(gva, G, flags=P | RW)                      # supervisor-only
    assert len(g.vcpu.access(gva, 4, "read", cpl=0).mmio_exit_records) == 1       # row 7 first (MMIO spte exists)
    s = g.snap()
    return g.vcpu.access(gva + 8, 4, "read", cpl=3), s


def test_row9_user_access_to_supervisor_mmio_injects_pf(guest: Guest) -> None:
    """A.9: after 7, a user-mode access where the gpte had U=0 is a permission fault: #PF (P|U = 0x5,
    CR2 = the address) injected into the guest (pf_guest+1), no exit."""
    g = guest
    r, s = _row9(g)
    d = s.delta()
    assert r.fault == GuestFault(14, 0x5, V + 9 * PAGE + 8)
    assert r.mmio_exit_records == []
    assert d.vcpu["pf_guest"] == 1 and d.vcpu["mmio_exits"] == 0
    g.audit()


def test_row9_pf_taken_follows_the_fast_path_rule(guest: Guest) -> None:
    """A.9 lists pf_taken+1, but §3.2/§3.3 say an RSVD fault whose gva matches the MMIO cache returns
    EMULATE from handle_mmio_page_fault *before* pf_taken is counted; the permission fault is then
    found by the emulator's gva->gpa walk (§3.12 step 3), which injects the #PF (pf_guest+1).  This test
    follows §3.2 (pf_taken+0) - the table row contradicts the algorithm it summarises."""
    g = guest
    r, s = _row9(g)
    assert_pf(s.delta(), pf_guest=1, mmio_exits=0)
    g.audit()


def test_row9_cold_user_access_to_supervisor_mmio(guest: Guest) -> None:
    """A.9 without a prior supervisor access (no MMIO spte): the full path's guest walk fails (pf_taken+1,
    pf_guest+1); no MMIO spte is created and nothing is cached."""
    g = guest
    gva = V + 9 * PAGE
    g.pt.map(gva, G, flags=P | RW)
    s = g.snap()
    r = g.vcpu.access(gva, 4, "read", cpl=3)
    assert r.fault == GuestFault(14, 0x5, gva) and r.mmio_exit_records == []
    assert_pf(s.delta(), pf_taken=1, pf_guest=1, mmio_exits=0)
    assert (g.vcpu.mmio_gva, g.vcpu.mmio_gfn) == (0, 0)
    assert not is_shadow_mmio_spte(g.leaf_spte(gva)[1])
    g.audit()


def test_row9_user_write_to_user_readonly_mmio(guest: Guest) -> None:
    """A.9 variant: gpte P|U (read-only), a user read creates the MMIO spte; a user write is a
    protection fault (#PF P|W|U = 0x7), no exit."""
    g = guest
    gva = V + 9 * PAGE
    g.pt.map(gva, G, flags=P | US)
    assert len(g.vcpu.access(gva, 4, "read", cpl=3).mmio_exit_records) == 1
    r = g.vcpu.access(gva, 4, "write", 1, cpl=3)
    assert r.fault == GuestFault(14, 0x7, gva) and r.mmio_exit_records == []
    g.audit()


# -- row 10 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("warm", [False, True], ids=["first access", "fast path"])
def test_row10_16_byte_store_is_two_8_byte_exits(guest: Guest, warm: bool) -> None:
    """A.10 / §3.12: a 16-byte MMIO store inside one page is one fragment, exited as two 8-byte
    KVM_EXIT_MMIO writes carrying the data in order; mmio_exits+1 (once per instruction)."""
    g = guest
    if warm:
        _first_mmio_access(g)
    data = bytes(range(0x30, 0x40))
    s = g.snap()
    r = g.vcpu.access(V + 0x40, 16, "write", data)
    assert _exits(r) == [(G + 0x40, 8, True, data[:8]), (G + 0x48, 8, True, data[8:])]
    assert s.delta().vcpu["mmio_exits"] == 1
    g.audit()


def test_row10_16_byte_load_assembles_two_exits(guest: Guest) -> None:
    """A.10 / §3.12 complete_emulated_mmio: a 16-byte load is two 8-byte reads; the value is their
    little-endian concatenation."""
    g = guest
    g.mmio_reads[G + 0x40] = 0x1111111111111111
    g.mmio_reads[G + 0x48] = 0x2222222222222222
    s = g.snap()
    r = g.vcpu.access(V + 0x40, 16, "read")
    assert [(e.phys_addr, e.len, e.is_write) for e in r.mmio_exit_records] == \
        [(G + 0x40, 8, False), (G + 0x48, 8, False)]
    assert r.value == 0x2222222222222222_1111111111111111
    assert s.delta().vcpu["mmio_exits"] == 1
    g.audit()


# -- row 11 -----------------------------------------------------------------------------------------
G2 = MMIO_GPA + 0x5000          # the second page is MMIO too, and not adjacent to G


def _straddle(g: Guest) -> None:
    g.pt.map(V + 0x10000, G)
    g.pt.map(V + 0x11000, G2)


STRADDLE = {
    "8 bytes at 0xffc": (0xFFC, 8, [(G + 0xFFC, 4), (G2, 4)]),
    "16 bytes at 0xff8": (0xFF8, 16, [(G + 0xFF8, 8), (G2, 8)]),
    "16 bytes at 0xffa": (0xFFA, 16, [(G + 0xFFA, 6), (G2, 8), (G2 + 8, 2)]),
    "2 bytes at 0xfff": (0xFFF, 2, [(G + 0xFFF, 1), (G2, 1)]),
}


@pytest.mark.parametrize("offset,size,pieces", STRADDLE.values(), ids=STRADDLE.keys())
def test_row11_page_straddling_store_two_fragments(guest: Guest, offset: int, size: int,
                                                   pieces: list[tuple[int, int]]) -> None:
    """A.11 / §3.12 / §5.13: an access straddling a page boundary with both halves MMIO is two fragments
    (each translated separately), one exit per <= 8-byte piece, data split in order; mmio_exits+1."""
    g = guest
    _straddle(g)
    data = bytes(range(1, size + 1))
    s = g.snap()
    r = g.vcpu.access(V + 0x10000 + offset, size, "write", data)
    want, pos = [], 0
    for gpa, n in pieces:
        want.append((gpa, n, True, data[pos:pos + n]))
        pos += n
    assert _exits(r) == want
    assert s.delta().vcpu["mmio_exits"] == 1
    g.audit()


def test_row11_page_straddling_load(guest: Guest) -> None:
    """A.11 for a load: pieces are read in order and the value is assembled little-endian."""
    g = guest
    _straddle(g)
    g.mmio_reads[G + 0xFFC] = 0xAABBCCDD
    g.mmio_reads[G2] = 0x11223344
    r = g.vcpu.access(V + 0x10FFC, 8, "read")
    assert [(e.phys_addr, e.len) for e in r.mmio_exit_records] == [(G + 0xFFC, 4), (G2, 4)]
    assert r.value == 0x11223344_AABBCCDD
    g.audit()


def test_row11_straddle_ram_then_mmio_exits_only_for_mmio_half(guest: Guest) -> None:
    """§3.12 step 3: a fragment that is RAM is written to guest memory; only the MMIO half exits."""
    g = guest
    g.pt.map(DATA, DATA)
    g.pt.map(DATA + PAGE, G)
    data = bytes(range(0x61, 0x69))
    r = g.vcpu.access(DATA + 0xFFC, 8, "write", data)
    assert _exits(r) == [(G, 4, True, data[4:])]
    assert g.vm.read_phys(DATA + 0xFFC, 4) == data[:4]
    g.audit()


# -- row 12 -----------------------------------------------------------------------------------------
class Dev:
    """An in-kernel MMIO device that records what it handled."""

    def __init__(self, handles: bool = True) -> None:
        self.handles = handles
        self.writes: list[tuple[int, int, int]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, addr: int, length: int) -> int | None:
        self.reads.append((addr, length))
        return 0x5EEDF00DCAFEBABE & ((1 << (8 * length)) - 1) if self.handles else None

    def write(self, addr: int, length: int, value: int) -> bool:
        self.writes.append((addr, length, value))
        return self.handles


DEV_BASE, DEV_LEN = G + 0x100, 0x100


def test_row12_write_inside_device_is_handled_in_kernel(guest: Guest) -> None:
    """A.12: an MMIO write fully inside an in-kernel io-bus device range is handled in the kernel: no
    KVM_EXIT_MMIO, mmio_exits unchanged; the device receives address, length and value."""
    g = guest
    dev = Dev()
    g.vm.register_io_device(DEV_BASE, DEV_LEN, dev)
    s = g.snap()
    r = g.vcpu.access(V + 0x180, 4, "write", 0x12345678)
    assert r.mmio_exit_records == [] and r.fault is None
    assert dev.writes == [(DEV_BASE + 0x80, 4, 0x12345678)]
    assert s.delta().vcpu["mmio_exits"] == 0
    g.audit()


def test_row12_read_inside_device_is_handled_in_kernel(guest: Guest) -> None:
    """A.12 for a load (§3.12 step 4): the in-kernel device supplies the value, no exit."""
    g = guest
    dev = Dev()
    g.vm.register_io_device(DEV_BASE, DEV_LEN, dev)
    r = g.vcpu.access(V + 0x1F8, 8, "read")
    assert r.mmio_exit_records == [] and r.value == 0x5EEDF00DCAFEBABE
    assert dev.reads == [(DEV_BASE + 0xF8, 8)]
    g.audit()


PARTIAL = {
    "crosses the device's end": (0x1FE, 4),
    "crosses the device's start": (0xFE, 4),
}


@pytest.mark.parametrize("offset,size", PARTIAL.values(), ids=PARTIAL.keys())
def test_row12_partially_overlapping_write_goes_to_userspace(guest: Guest, offset: int, size: int) -> None:
    """A.12 / §3.12 kvm_io_bus_cmp: a match means the access is contained in the range; a write only
    partially overlapping the device goes to userspace and the device sees nothing."""
    g = guest
    dev = Dev()
    g.vm.register_io_device(DEV_BASE, DEV_LEN, dev)
    s = g.snap()
    r = g.vcpu.access(V + offset, size, "write", 0xA5A5A5A5)
    assert [(e.phys_addr, e.len, e.is_write) for e in r.mmio_exit_records] == [(G + offset, size, True)]
    assert dev.writes == []
    assert s.delta().vcpu["mmio_exits"] == 1
    g.audit()


def test_row12_device_declining_goes_to_userspace(guest: Guest) -> None:
    """§3.12: a device returning -EOPNOTSUPP passes; with no other taker the write exits."""
    g = guest
    g.vm.register_io_device(DEV_BASE, DEV_LEN, Dev(handles=False))
    r = g.vcpu.access(V + 0x180, 4, "write", 1)
    assert [(e.phys_addr, e.len) for e in r.mmio_exit_records] == [(G + 0x180, 4)]
    g.audit()


def test_row12_16_byte_write_half_inside_device(guest: Guest) -> None:
    """§3.12 step 4: vcpu_mmio_write works in <= 8-byte chunks and stops at the first unhandled one; the
    remainder becomes the fragment that exits to userspace."""
    g = guest
    dev = Dev()
    g.vm.register_io_device(DEV_BASE, DEV_LEN, dev)
    data = bytes(range(16))
    r = g.vcpu.access(V + 0x1F8, 16, "write", data)
    assert dev.writes == [(DEV_BASE + 0xF8, 8, int.from_bytes(data[:8], "little"))]
    assert _exits(r) == [(G + 0x200, 8, True, data[8:])]
    g.audit()


def test_row12_zero_length_range_matches_only_its_address(guest: Guest) -> None:
    """§3.12 kvm_io_bus_cmp: a range of length 0 matches an access only at exactly its address (any
    length) - an ioeventfd-style doorbell."""
    g = guest
    dev = Dev()
    g.vm.register_io_device(G + 0x40, 0, dev)
    assert g.vcpu.access(V + 0x40, 4, "write", 1).mmio_exit_records == []
    assert len(g.vcpu.access(V + 0x44, 4, "write", 2).mmio_exit_records) == 1
    assert dev.writes == [(G + 0x40, 4, 1)]
    g.audit()


def test_row12_coalesced_zone_buffers_writes_reads_exit(guest: Guest) -> None:
    """§3.12: coalesced MMIO zones buffer writes in a ring without exiting; reads still exit."""
    g = guest
    g.vm.register_coalesced_mmio(G + 0x800, 0x100)
    s = g.snap()
    r = g.vcpu.access(V + 0x810, 4, "write", 0x99)
    assert r.mmio_exit_records == [] and s.delta().vcpu["mmio_exits"] == 0
    assert list(g.vm.coalesced_ring) == [(G + 0x810, 4, 0x99)]
    assert len(g.vcpu.access(V + 0x810, 4, "read").mmio_exit_records) == 1
    g.audit()


# -- row 13 -----------------------------------------------------------------------------------------
def test_row13_access_during_update_takes_full_path() -> None:
    """A.13 / §3.11: while a memslot update is in flight (generation flag set) check_mmio_spte refuses the
    valid-looking spte -> INVALID -> full path (pf_taken+1, pf_mmio_spte_created+1, pf_emulate+1); the
    new spte gets the old generation without the flag; nothing is cached."""
    g = Guest()
    _first_mmio_access(g)
    g.vcpu.write_cr3(g.pt.cr3)                      # empty the gva cache so only the spte can answer
    old_gen = g.vm.memslots.generation(0)
    seen: dict = {}

    def during() -> None:
        assert g.vm.memslots.generation(0) & IN_PROGRESS
        s = g.snap()
        seen["r"] = g.vcpu.access(V + 0x10, 4, "read")
        seen["d"] = s.delta()
        seen["spte"] = g.leaf_spte(V)[1]
        seen["cache"] = (g.vcpu.mmio_gva, g.vcpu.mmio_gen)

    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB, during_update=during)
    assert len(seen["r"].mmio_exit_records) == 1
    assert_pf(seen["d"], pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    assert seen["d"].model["mmio_fastpath_invalid"] == 1
    assert is_shadow_mmio_spte(seen["spte"]) and mmio_spte_gen(seen["spte"]) == old_gen & GEN_MASK
    assert seen["cache"] == (0, old_gen), "vcpu_cache_mmio_info must refuse while the flag is set"
    g.vcpu.access(WARM, 8, "read")
    g.audit()


def test_row13_spte_from_update_window_misses_once_more() -> None:
    """A.13: after the update completes the generation has advanced by nr_as, so the spte built during
    the update misses exactly once more (full path), then the fast path serves."""
    g = Guest()
    _first_mmio_access(g)
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB,
                                during_update=lambda: g.vcpu.access(V + 0x10, 4, "read"))
    s = g.snap()
    g.vcpu.access(V + 0x10, 4, "read")
    assert_pf(s.delta(), pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    s = g.snap()
    g.vcpu.access(V + 0x10, 4, "read")
    assert_pf(s.delta(), mmio_exits=1)
    g.audit()


def test_row13_fast_path_disabled_for_whole_window() -> None:
    """§5.2: during the update the fast path is disabled and nothing is cached, so every access in the
    window takes the full path (two accesses: pf_taken+2, pf_mmio_spte_created+2)."""
    g = Guest()
    _first_mmio_access(g)
    seen: dict = {}

    def during() -> None:
        s = g.snap()
        g.vcpu.access(V + 0x10, 4, "read")
        g.vcpu.access(V + 0x10, 4, "read")
        seen["d"] = s.delta()

    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB, during_update=during)
    assert_pf(seen["d"], pf_taken=2, pf_mmio_spte_created=2, pf_emulate=2, mmio_exits=2)
    g.audit()


def test_row13_new_slot_visible_during_update() -> None:
    """§2.7 steps 1-2: the new memslots are published before the flag is cleared, so an access during the
    update that creates G's slot already maps RAM (pf_fixed+1, no exit)."""
    g = Guest()
    _first_mmio_access(g)
    seen: dict = {}

    def during() -> None:
        s = g.snap()
        seen["r"] = g.vcpu.access(V + 0x10, 4, "read")
        seen["d"] = s.delta()

    g.vm.set_user_memory_region(slot=2, guest_phys_addr=G, memory_size=MiB, during_update=during)
    assert seen["r"].mmio_exit_records == []
    assert_pf(seen["d"], pf_taken=1, pf_fixed=1)
    g.audit()


def test_row13_access_to_deleted_range_during_delete() -> None:
    """A.13 with a DELETE (§2.7: the callback runs in swap #2, after the INVALID copy and the zap): the
    range has no slot any more, so the access is MMIO; its spte carries the in-flight generation without
    the flag and misses exactly once after the update (pf_taken+1, pf_mmio_spte_created+1)."""
    g = Guest()
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    g.pt.map(DATA, 0xE000_0000)
    g.vcpu.access(DATA, 4, "read")
    seen: dict = {}

    def during() -> None:
        gen = g.vm.memslots.generation(0)
        seen["gen"] = gen
        s = g.snap()
        seen["r"] = g.vcpu.access(DATA, 4, "read")
        seen["d"] = s.delta()
        seen["spte"] = g.leaf_spte(DATA)[1]

    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=0, during_update=during)
    assert seen["gen"] & IN_PROGRESS
    assert [e.phys_addr for e in seen["r"].mmio_exit_records] == [0xE000_0000]
    assert_pf(seen["d"], pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    assert mmio_spte_gen(seen["spte"]) == seen["gen"] & GEN_MASK
    assert not seen["spte"] & IN_PROGRESS
    s = g.snap()
    g.vcpu.access(DATA, 4, "read")
    assert_pf(s.delta(), pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    g.audit()
