"""The shadow MMU and its MMIO fast path for every guest paging mode (32-bit, PAE, 4-level, 5-level).

Spec: §2.3 (soft MMU root level = max(guest level, 3): KVM always builds PAE-or-wider sptes, 32-bit
guests on PAE tables with quadrants), §3.3 (the lockless walk starts at pae_root for a PAE root),
§3.5.1 (error codes: F only with EFER.NX or SMEP), §3.9 (MMIO sptes are 4 KiB leaves).
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu import GuestFault
from kvmmu.arch.bits import (
    EFER_LME,
    EFER_NX,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR0_WP,
    X86_CR4_LA57,
    X86_CR4_PAE,
    X86_CR4_PSE,
)
from kvmmu.guest.pagetables import RW, GuestPageTables, P, vm_writer
from tests.kvm.harness import (
    DATA,
    GEN_MASK,
    MMIO_GPA,
    MMIO_GVA,
    POOL,
    POOL_END,
    RAM_SIZE,
    WARM,
    Snapshot,
    assert_pf,
    is_shadow_mmio_spte,
    mmio_spte_gen,
    mmio_spte_gfn,
)

G, V = MMIO_GPA, MMIO_GVA
SUPER = DATA + 0x8000              # a supervisor-only page
CR0 = X86_CR0_PG | X86_CR0_PE | X86_CR0_WP
MODES = {
    "32bit": dict(cr0=CR0, cr4=0, efer=0),
    "pae": dict(cr0=CR0, cr4=X86_CR4_PAE, efer=EFER_NX),
    "4level": dict(cr0=CR0, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX),
    "5level": dict(cr0=CR0, cr4=X86_CR4_PAE | X86_CR4_LA57, efer=EFER_LME | EFER_NX),
}


class ModeGuest:
    """Slot 0 RAM, tables in POOL; WARM, DATA (-> DATA), V (-> G, MMIO) and SUPER (supervisor) mapped."""

    def __init__(self, mode: str, *, cr4: int | None = None, pool_identity: bool = False) -> None:
        self.vm = kvmmu.VM(mmu="shadow", mmio_caching="generation")
        self.vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=RAM_SIZE)
        w, r = vm_writer(self.vm)
        self.pt = GuestPageTables(mode, w, r, pool=POOL, pool_end=POOL_END)
        if pool_identity:
            self.pt.map_range(POOL, POOL, POOL_END - POOL)
        for gva, gpa in ((WARM, WARM), (DATA, DATA), (V, G)):
            self.pt.map(gva, gpa)
        self.pt.map(SUPER, DATA, flags=P | RW)
        regs = dict(MODES[mode])
        if cr4 is not None:
            regs["cr4"] = cr4
        self.vcpu = self.vm.create_vcpu()
        self.vcpu.set_sregs(cr3=self.pt.cr3, **regs)     # PAE: the PDPTEs are loaded here
        assert self.vcpu.access(WARM, 4, "read").fault is None

    def snap(self) -> Snapshot:
        return Snapshot(self.vm, self.vcpu)

    def leaf(self, gva: int) -> tuple[int, int]:
        return list(self.vcpu.mmu.shadow_walk(gva))[-1]


@pytest.mark.parametrize("mode", MODES)
def test_first_touch_in_every_mode(mode: str) -> None:
    """§3.6: first touch of a RAM page: pf_taken+1, pf_fixed+1, pages_4k+1."""
    g = ModeGuest(mode)
    g.vm.write_phys(DATA, b"\x11\x22\x33\x44")
    s = g.snap()
    r = g.vcpu.access(DATA, 4, "read")
    d = s.delta()
    assert r.value == 0x44332211
    assert_pf(d, pf_taken=1, pf_fixed=1)
    assert d.vm["pages_4k"] == 1
    g.vm.audit()


@pytest.mark.parametrize("mode", MODES)
def test_shadow_root_is_pae_or_wider(mode: str) -> None:
    """§2.3: the soft-MMU root level is max(guest level, 3)."""
    g = ModeGuest(mode)
    assert g.vcpu.mmu.root_level == {"32bit": 3, "pae": 3, "4level": 4, "5level": 5}[mode]


@pytest.mark.parametrize("mode", MODES)
def test_mmio_first_access_installs_4k_mmio_spte(mode: str) -> None:
    """A.7 in every mode: the first access creates a 4 KiB MMIO spte with gfn and current generation
    (pf_taken+1, pf_mmio_spte_created+1, pf_emulate+1) and fills the cache."""
    g = ModeGuest(mode)
    s = g.snap()
    r = g.vcpu.access(V + 0x10, 4, "read")
    assert [e.phys_addr for e in r.mmio_exit_records] == [G + 0x10]
    assert_pf(s.delta(), pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    level, spte = g.leaf(V)
    assert level == 1 and is_shadow_mmio_spte(spte)
    assert (mmio_spte_gfn(spte), mmio_spte_gen(spte)) == (G >> 12, g.vm.memslots.generation(0) & GEN_MASK)
    assert (g.vcpu.mmio_gva, g.vcpu.mmio_gfn) == (V, G >> 12)
    g.vm.audit()


@pytest.mark.parametrize("mode", MODES)
def test_mmio_fast_path_in_every_mode(mode: str) -> None:
    """A.2 in every mode: the second access moves no pf_* counter."""
    g = ModeGuest(mode)
    g.vcpu.access(V + 0x10, 4, "read")
    s = g.snap()
    assert len(g.vcpu.access(V + 0x10, 4, "read").mmio_exit_records) == 1
    assert_pf(s.delta(), mmio_exits=1)
    g.vm.audit()


@pytest.mark.parametrize("mode", MODES)
def test_mmio_spte_walk_in_every_mode(mode: str) -> None:
    """A.8 + §3.3 in every mode: with the gva cache cleared by a CR3 reload, the lockless walk of KVM's
    own tables (from pae_root for PAE roots) finds the MMIO spte: no pf_* counter moves."""
    g = ModeGuest(mode)
    g.vcpu.access(V + 0x10, 4, "read")
    g.vcpu.write_cr3(g.pt.cr3)
    s = g.snap()
    assert len(g.vcpu.access(V + 0x10, 4, "read").mmio_exit_records) == 1
    d = s.delta()
    assert_pf(d, mmio_exits=1)
    assert d.model["mmio_fastpath"] == 1
    g.vm.audit()


@pytest.mark.parametrize("mode", MODES)
def test_mmio_stale_generation_in_every_mode(mode: str) -> None:
    """A.4 in every mode: after an unrelated CREATE the spte is stale and re-created by the full path."""
    g = ModeGuest(mode)
    g.vcpu.access(V, 4, "read")
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=0xE000_0000, memory_size=1 << 20)
    s = g.snap()
    g.vcpu.access(V, 4, "read")
    assert_pf(s.delta(), pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    g.vm.audit()


@pytest.mark.parametrize("mode", MODES)
def test_user_read_of_supervisor_page_in_every_mode(mode: str) -> None:
    """§3.6 step 1 / §3.5.1: user read of a supervisor page -> #PF P|U (0x5), pf_guest+1."""
    g = ModeGuest(mode)
    s = g.snap()
    r = g.vcpu.access(SUPER, 4, "read", cpl=3)
    assert r.fault == GuestFault(14, 0x5, SUPER)
    assert_pf(s.delta(), pf_taken=1, pf_guest=1)
    g.vm.audit()


@pytest.mark.parametrize("mode", MODES)
def test_user_fetch_error_code_has_f_only_with_nx(mode: str) -> None:
    """§3.5.1 fault return: F is reported only if EFER.NX (or CR4.SMEP) is on - 32-bit paging here has
    neither, so a user fetch of a not-present page reports U only (0x4); with EFER.NX a user fetch of a
    supervisor page reports P|U|F (0x15)."""
    g = ModeGuest(mode)
    gva, want = (DATA + 0x9000, 0x4) if mode == "32bit" else (SUPER, 0x15)     # 32-bit: an unmapped page
    r = g.vcpu.access(gva, 4, "fetch", cpl=3)
    assert r.fault == GuestFault(14, want, gva)
    g.vm.audit()


# -- PAE: PDPTEs are loaded at CR3 load --------------------------------------------------------------------
def test_pae_cr3_reload_uses_the_new_pdptes() -> None:
    """§3.5.1 step 2 (the PAE walk starts from the PDPTRs cached at CR3 load) + SDM: after the guest
    clears PDPTE 1 in memory and reloads CR3 with the same value, an access through PDPTE 1 is a #PF with
    error code 0 (not present); before the reload the cached PDPTE still translates."""
    g = ModeGuest("pae")
    pdpte1 = g.pt.cr3 + 8
    assert int.from_bytes(g.vm.read_phys(pdpte1, 8), "little") & P, "V lives under PDPTE 1"
    assert g.vcpu.access(V, 4, "read").fault is None
    g.vm.write_phys(pdpte1, bytes(8))
    assert g.vcpu.access(V, 4, "read").fault is None          # still the PDPTE cached at the last load
    g.vcpu.write_cr3(g.pt.cr3)
    s = g.snap()
    r = g.vcpu.access(V, 4, "read")
    assert r.fault == GuestFault(14, 0x0, V)
    assert_pf(s.delta(), pf_taken=1, pf_guest=1)
    g.vm.audit()


def test_pae_cr3_switch_to_other_pdpt_uses_its_pdptes() -> None:
    """§3.5.1 step 2: loading a different CR3 in PAE mode loads that PDPT's entries."""
    g = ModeGuest("pae")
    w, r = vm_writer(g.vm)
    pt2 = GuestPageTables("pae", w, r, pool=0x20_0000, pool_end=0x30_0000)
    pt2.map(WARM, WARM)
    g.vcpu.access(V, 4, "read")
    g.vcpu.write_cr3(pt2.cr3)
    assert g.vcpu.access(V, 4, "read").fault == GuestFault(14, 0x0, V)      # pt2 has no PDPTE 1
    g.vm.audit()


# -- 32-bit guests: 4-byte gptes shadowed by PAE tables with quadrants ---------------------------------------------
def test_32bit_pde_rewrite_zaps_both_halves() -> None:
    """§2.2 quadrants + §3.11: a 4-byte PDE maps 4 MiB, shadowed by two PAE-sized entries; the guest's
    emulated rewrite of the PDE (mmu_pte_write+1) zaps them, so an address in the upper 2 MiB half now
    translates through the new page table."""
    g = ModeGuest("32bit", pool_identity=True)
    x = 0x60_0000                                   # upper half of the 4 MiB region 0x400000-0x7fffff
    g.pt.map(x, 0x80_0000)
    g.vm.write_phys(0x80_0000, b"old_page")
    g.vm.write_phys(0x90_0000, b"new_page")
    assert g.vcpu.access(x, 8, "read").value == int.from_bytes(b"old_page", "little")
    new_pt = g.pt.alloc_table()
    g.vm.write_phys(new_pt + 4 * ((x >> 12) & 1023), (0x90_0000 | 7).to_bytes(4, "little"))
    pde = g.pt.entry_addr(x, 2, create=False)
    g.vcpu.access(pde, 4, "read")
    s = g.snap()
    g.vcpu.access(pde, 4, "write", new_pt | 7)
    d = s.delta()
    assert_pf(d, pf_taken=1, pf_emulate=1)
    assert d.vm["mmu_pte_write"] == 1
    assert g.vcpu.access(x, 8, "read").value == int.from_bytes(b"new_page", "little")
    g.vm.audit()


def test_32bit_pse_4m_page_over_mmio() -> None:
    """§3.9 with a 32-bit guest and CR4.PSE: a 4 MiB guest page over unbacked memory gets 4 KiB MMIO
    sptes, one per touched 4 KiB page (pf_mmio_spte_created+1 each), then fast-path hits."""
    g = ModeGuest("32bit", cr4=X86_CR4_PSE)
    v4m = 0x8000_0000
    g.pt.map(v4m, G, page_size=4 << 20)
    for off, created in ((0, 1), (0x3F_F000, 1), (0x3F_F000, 0)):
        s = g.snap()
        r = g.vcpu.access(v4m + off, 4, "read")
        assert [e.phys_addr for e in r.mmio_exit_records] == [G + off]
        assert s.delta().vcpu["pf_mmio_spte_created"] == created
        level, spte = g.leaf(v4m + off)
        assert level == 1 and is_shadow_mmio_spte(spte) and mmio_spte_gfn(spte) == (G + off) >> 12
    g.vm.audit()
