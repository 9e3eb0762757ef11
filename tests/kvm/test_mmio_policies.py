"""The three MMIO policies on the same access stream: "off", "zap" (2011) and "generation" (today).

Spec: §5.4 and Appendix A invariant 7 (caching disabled), §6 "2011 - original series" (no generation:
creating or moving a memslot zapped all shadow pages), §2.7 / §3.11 (generation: CREATE never zaps).
"""

from __future__ import annotations

import pytest

from tests.kvm.harness import (
    DATA,
    MMIO_GPA,
    MMIO_GVA,
    PAGE_MASK,
    WARM,
    Guest,
    MiB,
    assert_pf,
    is_shadow_mmio_spte,
)

POLICIES = ("off", "zap", "generation")
STREAM = [(MMIO_GVA + 0x10, 4, "read"), (MMIO_GVA + 0x10, 4, "read"), (MMIO_GVA + 0x20, 4, "write"),
          (MMIO_GVA + 0x30, 8, "read")]
# Per access of STREAM: (pf_taken, pf_emulate, pf_mmio_spte_created).
EXPECTED = {
    # §5.4: every access to an unbacked gpa takes the full path and returns EMULATE without an spte.
    "off": [(1, 1, 0)] * 4,
    # §1 / A.1-2: the first access installs the MMIO spte; later ones take the fast path (no pf_*).
    "zap": [(1, 1, 1)] + [(0, 0, 0)] * 3,
    "generation": [(1, 1, 1)] + [(0, 0, 0)] * 3,
}


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_on_the_same_access_stream(policy: str) -> None:
    """The same four MMIO accesses: pf_taken / pf_emulate / pf_mmio_spte_created per access follow the
    policy; every access is exactly one exit to userspace (mmio_exits+1)."""
    g = Guest(mmio_caching=policy)
    for i, ((gva, size, kind), (taken, emulate, created)) in enumerate(zip(STREAM, EXPECTED[policy], strict=True)):
        s = g.snap()
        r = g.vcpu.access(gva, size, kind, 7 if kind == "write" else None)
        want = [(MMIO_GPA + (gva & 0xFFF), kind == "write")]
        assert [(e.phys_addr, e.is_write) for e in r.mmio_exit_records] == want, i
        assert_pf(s.delta(), pf_taken=taken, pf_emulate=emulate, pf_mmio_spte_created=created, mmio_exits=1)
    g.audit()


def test_off_never_creates_mmio_sptes() -> None:
    """Invariant 7: with caching disabled no spte is ever MMIO; the leaf for the MMIO gva stays
    non-present however often it is accessed."""
    g = Guest(mmio_caching="off")
    for _ in range(3):
        g.vcpu.access(MMIO_GVA, 4, "read")
        level, spte = g.leaf_spte(MMIO_GVA)
        assert not is_shadow_mmio_spte(spte) and not spte & (1 << 11)
    g.audit()


def test_off_every_access_walks_guest_and_memslots() -> None:
    """§5.4: every access takes the full path: a guest walk and a memslot search each time."""
    g = Guest(mmio_caching="off")
    g.vcpu.access(MMIO_GVA, 4, "read")
    s = g.snap()
    g.vcpu.access(MMIO_GVA, 4, "read")
    d = s.delta()
    assert d.model["guest_walks"] >= 1 and d.model["memslot_lookups"] >= 1, d.moved()
    g.audit()


def test_off_still_fills_the_vcpu_cache() -> None:
    """§5.4: with caching disabled the no-slot path still fills the per-vCPU cache (gva, gfn, gen)."""
    g = Guest(mmio_caching="off")
    g.vcpu.access(MMIO_GVA + 0x10, 4, "read")
    v = g.vcpu
    assert (v.mmio_gva, v.mmio_gfn, v.mmio_gen) == (MMIO_GVA & PAGE_MASK, MMIO_GPA >> 12,
                                                    g.vm.memslots.generation(0))
    g.audit()


def test_generation_policy_unrelated_slot_zaps_nothing() -> None:
    """§2.7: under the generation design CREATE never zaps; the stale MMIO spte is handled by the
    generation check instead (mmu_shadow_zapped unchanged)."""
    g = Guest(mmio_caching="generation")
    g.vcpu.access(MMIO_GVA, 4, "read")
    s = g.snap()
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    assert s.delta().vm["mmu_shadow_zapped"] == 0
    g.audit()


def test_zap_policy_unrelated_slot_zaps_every_shadow_page() -> None:
    """§6 (2011): with no generation in MMIO sptes, creating a memslot - even an unrelated one - zaps all
    shadow pages (mmu_shadow_zapped grows by at least their number; no leaf spte remains)."""
    g = Guest(mmio_caching="zap")
    g.pt.map(DATA, DATA)
    g.vcpu.access(DATA, 8, "read")
    g.vcpu.access(MMIO_GVA, 4, "read")
    before = g.shadow_pages()
    s = g.snap()
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    assert s.delta().vm["mmu_shadow_zapped"] >= len(before)
    assert g.vm.stats["pages_4k"] == 0
    g.vcpu.access(WARM, 8, "read")
    g.audit()


def test_zap_policy_move_zaps_every_shadow_page() -> None:
    """§6 (2011): moving a memslot zaps all shadow pages as well."""
    g = Guest(mmio_caching="zap")
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    g.pt.map(DATA, DATA)
    g.vcpu.access(DATA, 8, "read")
    s = g.snap()
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xF000_0000, memory_size=MiB)
    assert s.delta().vm["mmu_shadow_zapped"] > 0 and g.vm.stats["pages_4k"] == 0
    g.vcpu.access(WARM, 8, "read")
    g.audit()


def test_zap_policy_mmio_after_zap_takes_full_path() -> None:
    """§6: after the zap there is no MMIO spte at all: the next access is an ordinary (non-RSVD) fault
    that re-creates it (pf_taken+1, pf_mmio_spte_created+1, pf_emulate+1), not a stale-generation miss."""
    g = Guest(mmio_caching="zap")
    g.vcpu.access(MMIO_GVA, 4, "read")
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    s = g.snap()
    g.vcpu.access(MMIO_GVA, 4, "read")
    d = s.delta()
    assert_pf(d, pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    assert d.model["mmio_fastpath_invalid"] == 0
    g.audit()


@pytest.mark.parametrize("policy,refaults", [("generation", 0), ("zap", 1)])
def test_ram_page_after_unrelated_slot(policy: str, refaults: int) -> None:
    """The cost difference of the two designs: after an unrelated CREATE, an already-mapped RAM page
    needs no fault under "generation" but must be faulted in again under "zap"."""
    g = Guest(mmio_caching=policy)
    g.pt.map(DATA, DATA)
    g.vcpu.access(DATA, 8, "read")
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    s = g.snap()
    g.vcpu.access(DATA, 8, "read")
    assert_pf(s.delta(), pf_taken=refaults, pf_fixed=refaults)
    g.audit()


@pytest.mark.parametrize("policy", POLICIES)
def test_slot_created_over_mmio_gpa_maps_ram(policy: str) -> None:
    """A.3 under every policy: once G is backed, the next access maps RAM (pf_taken+1, pf_fixed+1) and
    does not exit."""
    g = Guest(mmio_caching=policy)
    g.vcpu.access(MMIO_GVA, 4, "read")
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=MMIO_GPA, memory_size=MiB)
    g.vm.write_phys(MMIO_GPA, b"RAMRAMRA")
    s = g.snap()
    r = g.vcpu.access(MMIO_GVA, 8, "read")
    assert r.mmio_exit_records == [] and r.value == int.from_bytes(b"RAMRAMRA", "little")
    assert_pf(s.delta(), pf_taken=1, pf_fixed=1)
    g.audit()


@pytest.mark.parametrize("policy", POLICIES)
def test_delete_zaps_under_every_policy(policy: str) -> None:
    """§2.7: DELETE flushes the shadow MMU (zap all, default quirk) whatever the MMIO policy."""
    g = Guest(mmio_caching=policy)
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=MiB)
    g.pt.map(DATA, DATA)
    g.vcpu.access(DATA, 8, "read")
    s = g.snap()
    g.vm.set_user_memory_region(slot=2, guest_phys_addr=0xE000_0000, memory_size=0)
    assert s.delta().vm["mmu_shadow_zapped"] > 0 and g.vm.stats["pages_4k"] == 0
    g.vcpu.access(WARM, 8, "read")
    g.audit()


def test_zap_policy_mmio_spte_uses_2011_encoding() -> None:
    """§6 (2011): one global mask, MMIO <=> (spte & mask) == mask, with the non-EPT mask = all PA bits from
    MAXPHYADDR (46 here) up to 62 plus P; spte = mask | (access & (W|U)) | gfn << 12, no generation."""
    g = Guest(mmio_caching="zap")
    g.vcpu.access(MMIO_GVA, 4, "read")                     # clean RW user gpte, read: access = U
    mask_2011 = (((1 << (62 - 46 + 1)) - 1) << 46) | 1
    assert g.leaf_spte(MMIO_GVA) == (1, mask_2011 | 0x4 | MMIO_GPA)
    g.audit()
