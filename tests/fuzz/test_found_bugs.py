"""Minimised reproducers of the model bugs the stateful fuzzer found (tests/fuzz/test_fuzz.py).

Each test is one architectural rule, stated in its docstring with its source, on the smallest guest
that shows the model breaking it.  They fail until the model is fixed; none of them works around
anything.  The guest writes its own page tables through its vCPU (the table pool is mapped at
gva == gpa); the VMM only sets things up before the first vCPU runs.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import (
    EFER_LME,
    EFER_NX,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR0_WP,
    X86_CR4_PAE,
    X86_CR4_PGE,
    X86_CR4_PKE,
    X86_CR4_PSE,
    X86_CR4_SMAP,
    X86_EFLAGS_AC,
)
from kvmmu.guest.pagetables import NX, RW, US, A, D, GuestPageTables, P, vm_writer

POOL, POOL_END = 0x100000, 0x140000
MMIO = 0xD000_0000
LONG_MODE = dict(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
DATA = 0x1122334455667788


class Guest:
    """RAM [0, 16 MiB) in slot 0, page tables in [POOL, POOL_END) mapped at gva == gpa (supervisor)."""

    def __init__(self, mmu: str, mode: str = "4level", **vm_kw: object) -> None:
        self.vm = kvmmu.VM(mmu=mmu, **vm_kw)  # type: ignore[arg-type]
        self.vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
        self.pt = GuestPageTables(mode, *vm_writer(self.vm), pool=POOL, pool_end=POOL_END)
        self.pt.map_range(POOL, POOL, POOL_END - POOL, P | RW | A | D)
        self.vm.mmio_handler = lambda exit_: 0x77
        self.vcpu = self.vm.create_vcpu()

    def store(self, gpa: int, value: int, size: int = 8) -> None:
        """The guest kernel stores to one of its page tables (CPL0, through its own mapping)."""
        r = self.vcpu.access(gpa, size, "write", value, cpl=0)
        assert r.fault is None and not r.mmio_exit_records, f"the guest's store to its table at {gpa:#x}: {r}"


def pf(r: kvmmu.AccessResult) -> int | None:
    return r.fault.error_code if r.fault is not None and r.fault.vector == 14 else None


# ------------------------------------------------------------------------------------------------
# 1. TLB invalidation by INVLPG and by #PF.
@pytest.mark.parametrize("mmu", ["ept", "npt"])
def test_invlpg_drops_every_4k_piece_of_a_large_page(mmu: str) -> None:
    """SDM Vol. 3A 4.10.2.3 / 4.10.4.1: a CPU may cache 4 KiB pieces of a large page, but INVLPG of
    any address in the page invalidates all of them.  Found by the fuzzer (TDP CPU keeps the other
    pieces: its TLB is keyed by 4 KiB page number and INVLPG pops only that one)."""
    g = Guest(mmu)
    pde = g.pt.map(0x4000_0000, 0x20_0000, 2 << 20, P | RW | A | D)
    g.vm.write_phys(0x20_1000, DATA.to_bytes(8, "little"))
    g.vcpu.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    assert g.vcpu.access(0x4000_0000, 8, "read").fault is None
    assert g.vcpu.access(0x4000_1000, 8, "read").value == DATA
    g.store(pde, 0)                                  # unmap the 2 MiB page ...
    g.vcpu.invlpg(0x4000_0000)                       # ... and invalidate it
    r = g.vcpu.access(0x4000_1000, 8, "read")
    assert pf(r) == 0x0, f"expected #PF(not present) at 0x40001000 after INVLPG of the large page, got {r}"


@pytest.mark.parametrize("mmu", ["ept", "npt"])
def test_page_fault_drops_every_4k_piece_of_a_large_page(mmu: str) -> None:
    """SDM Vol. 3A 4.10.4.1: a #PF invalidates the TLB entries for the faulting address, and for a
    large page cached as 4 KiB pieces "all TLB entries corresponding to the translation"."""
    g = Guest(mmu)
    pde = g.pt.map(0x4000_0000, 0x20_0000, 2 << 20, P | RW | A | D)
    g.vm.write_phys(0x20_1000, DATA.to_bytes(8, "little"))
    g.vcpu.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    assert g.vcpu.access(0x4000_1000, 8, "read").value == DATA
    g.store(pde, 0)                                  # unmap, no INVLPG
    assert pf(g.vcpu.access(0x4000_2000, 8, "read")) == 0x0     # a piece never cached: #PF
    r = g.vcpu.access(0x4000_1000, 8, "read")
    assert pf(r) == 0x0, f"expected #PF at 0x40001000 (the #PF invalidated the large page), got {r}"


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_injected_page_fault_invalidates_the_faulting_page(mmu: str) -> None:
    """SDM Vol. 3A 4.10.4.1: "a page-fault exception resulting from an attempt to use a linear address
    will invalidate ... any TLB entry for that address's page number".  A #PF that KVM injects from
    its emulator (here: a load that crosses into an MMIO page) must do the same; the model leaves
    the stale entry, so the next load succeeds through a translation the guest removed."""
    g = Guest(mmu)
    pte = g.pt.map(0x40_0000, 0x50_0000, flags=P | RW | A | D)
    g.pt.map(0x40_1000, MMIO, flags=P | RW | A | D)
    g.vm.write_phys(0x50_0FF8, DATA.to_bytes(8, "little"))
    g.vcpu.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    assert g.vcpu.access(0x40_0FF8, 8, "read").value == DATA      # cached
    g.store(pte, 0x50_0000 | RW | A | D)             # P=0, no INVLPG
    g.store(pte, 0x50_0000 | RW | A | D)
    r = g.vcpu.access(0x40_0FFC, 8, "read")          # RAM page + MMIO page: emulated
    assert pf(r) == 0x0 and r.fault.cr2 == 0x40_0FFC, r
    r = g.vcpu.access(0x40_0FF8, 8, "read")
    assert pf(r) == 0x0, f"expected #PF at 0x400ff8 (the previous #PF invalidated its page), got {r}"


# ------------------------------------------------------------------------------------------------
# 2. PAE PDPTE registers.
def _pae_guest(mmu: str) -> tuple[Guest, int]:
    g = Guest(mmu, "pae")
    g.pt.map(0x0040_0000, 0x60_0000, flags=P | RW | A | D)
    g.vm.write_phys(0x60_0000, DATA.to_bytes(8, "little"))
    g.vcpu.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr3=g.pt.cr3, cr4=X86_CR4_PAE, efer=EFER_NX)
    return g, g.pt.cr3                               # PDPTE 0 is at cr3 + 0


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
@pytest.mark.parametrize("write", ["cr0.wp", "cr4.smap", "cr4.pke", "efer.nx"])
def test_pae_pdptes_are_not_reloaded_by_unrelated_control_bits(mmu: str, write: str) -> None:
    """SDM Vol. 3A 4.4.1: the PDPTE registers are loaded by MOV to CR3, and by MOV to CR0/CR4 only when
    it changes CR0.CD/NW/PG or CR4.PAE/PGE/PSE/SMEP (KVM: X86_CR0_PDPTR_BITS, X86_CR4_PDPTR_BITS).
    A change of CR0.WP, CR4.SMAP, CR4.PKE or EFER.NXE keeps the loaded PDPTEs, so a guest that has
    just cleared PDPTE 0 in memory still translates through the old one; the model reloads them
    (and raises InvalidArgument when the memory copy has a reserved bit)."""
    g, pdpt = _pae_guest(mmu)
    v = g.vcpu
    assert v.access(0x0040_0000, 8, "read").value == DATA
    g.store(pdpt, 0)                                 # PDPTE 0 := not present, in memory only
    if write == "cr0.wp":
        v.write_cr0(v.cr0 & ~X86_CR0_WP)
    elif write == "efer.nx":
        v.write_efer(v.efer & ~EFER_NX)
    else:
        v.write_cr4(v.cr4 | (X86_CR4_SMAP if write == "cr4.smap" else X86_CR4_PKE))
    r = v.access(0x0040_0000, 8, "read")
    assert r.value == DATA, f"after {write}: expected the cached PDPTE 0 to still translate, got {r}"


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_pae_reserved_pdpte_in_memory_does_not_fault_a_cr0_wp_write(mmu: str) -> None:
    """SDM Vol. 3A 4.4.1: MOV to CR0 that changes only CR0.WP does not load the PDPTEs, so it cannot #GP
    on a reserved bit in the memory copy.  The model raises InvalidArgument from the guest's own
    MOV CR0 (a guest action crashes the API call)."""
    g, pdpt = _pae_guest(mmu)
    g.store(pdpt + 8, 0x3000 | P | (1 << 63))        # PDPTE 1 := present with reserved bit 63
    g.vcpu.write_cr0(g.vcpu.cr0 & ~X86_CR0_WP)       # must not raise
    assert not g.vcpu.cr0 & X86_CR0_WP


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_pae_cr4_pge_change_reloads_the_pdptes(mmu: str) -> None:
    """SDM Vol. 3A 4.4.1 (and KVM's X86_CR4_PDPTR_BITS): MOV to CR4 changing CR4.PGE loads the PDPTEs
    from memory.  The model does not (PGE is not one of its role bits), so the stale PDPTE 0 keeps
    translating."""
    g, pdpt = _pae_guest(mmu)
    v = g.vcpu
    assert v.access(0x0040_0000, 8, "read").value == DATA
    g.store(pdpt, 0)
    v.write_cr4(v.cr4 | X86_CR4_PGE)
    r = v.access(0x0040_0000, 8, "read")
    assert pf(r) == 0x0, f"expected #PF(not present): CR4.PGE reloaded PDPTE 0 = 0, got {r}"


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_pae_pdpt_without_memslot_is_a_gp(mmu: str) -> None:
    """KVM's load_pdptrs fails when the PDPT cannot be read (no memslot), so MOV CR3 / KVM_SET_SREGS
    #GPs (kvmmu: InvalidArgument); the model reads zeros and loads four not-present PDPTEs."""
    g, _ = _pae_guest(mmu)
    with pytest.raises(kvmmu.InvalidArgument):
        g.vcpu.write_cr3(0x3000_0000)                # no memslot there
    with pytest.raises(kvmmu.InvalidArgument):
        g.vcpu.set_sregs(cr3=0x3000_0000)


# ------------------------------------------------------------------------------------------------
# 3. The emulator's guest-virtual -> guest-physical translation.
GVA = 0x80_4000_0008            # PML4 index 1, PDPT index 1: its PDPTE is at offset 8 of the PDPT, like the gva


def _pdpt_elsewhere(mmu: str, readonly: bool) -> Guest:
    """GVA translates through a PDPT at gpa 0x200_0000 (memslot 1) whose PDPTE has A=0."""
    g = Guest(mmu)
    pdpt, pd, pt = 0x200_0000, 0x30_0000, 0x30_1000
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=pdpt, memory_size=0x10000,
                                flags=kvmmu.KVM_MEM_READONLY if readonly else 0)
    g.vm.write_phys(pdpt + 8, (pd | P | RW).to_bytes(8, "little"))
    g.vm.write_phys(pd, (pt | P | RW | A).to_bytes(8, "little"))
    g.vm.write_phys(pt, (0x70_0000 | P | RW | A | D).to_bytes(8, "little"))
    g.vm.write_phys(0x70_0008, DATA.to_bytes(8, "little"))
    g.vm.write_phys(g.pt.root + 8, (pdpt | P | RW | A).to_bytes(8, "little"))
    g.vcpu.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    return g


@pytest.mark.parametrize("mmu", ["ept", "npt"])
def test_emulated_access_after_a_page_table_exit_uses_the_data_address(mmu: str) -> None:
    """With EPT/NPT the CPU's A-bit write into a page table in a read-only memslot exits to KVM, whose
    emulator then performs the access.  The exit's gpa is the *page table's*; the model's emulator
    takes it as the data's gpa whenever the page offsets agree (KVM's gpa_available shortcut),
    so the load returns the PDPTE instead of the data."""
    g = _pdpt_elsewhere(mmu, readonly=True)
    r = g.vcpu.access(GVA, 8, "read")
    assert r.value == DATA and not r.mmio_exit_records, f"expected value {DATA:#x} (the data at 0x700008), got {r}"


@pytest.mark.parametrize("mmu", ["ept", "npt"])
def test_page_table_without_memslot_never_becomes_an_mmio_data_access(mmu: str) -> None:
    """A walk that reaches a page table at a gpa with no memslot ends in #PF(P=0) (KVM's walker:
    the table cannot be read).  The model's emulator uses the table's gpa as the data's gpa when
    the page offsets agree, and sends the guest's load to the VMM as KVM_EXIT_MMIO at the table."""
    g = _pdpt_elsewhere(mmu, readonly=False)
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=0x200_0000, memory_size=0)   # the PDPT is gone
    r = g.vcpu.access(GVA, 8, "read")
    assert pf(r) == 0x0 and not r.mmio_exit_records, f"expected #PF(not present), no exit; got {r}"


@pytest.mark.parametrize("mmu", ["ept", "npt"])
def test_page_table_behind_an_mmio_spte_never_becomes_the_data_address(mmu: str) -> None:
    """The same rule when the table's gpa already has an MMIO spte: the CPU's read of the PML4 takes
    an EPT misconfiguration (whose exit does not say it was a page-table access), KVM's fast path
    sends it to the emulator, and the model's emulator took the table's gpa as the data's (the
    offsets agree: gva 0, PML4 at offset 0), reporting KVM_EXIT_MMIO at the PML4 instead of #PF.
    Found by the fuzzer (a second vCPU, after the first had faulted on the deleted table slot)."""
    g = Guest(mmu)
    g.pt.map(0x0, 0x50_0000, flags=P | RW | A | D)
    a, b = g.vcpu, g.vm.create_vcpu()
    for v in (a, b):
        v.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    g.vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=0)   # the tables are gone
    assert pf(a.access(0x10, 4, "read")) == 0x0
    r = b.access(0x0, 1, "read")
    assert pf(r) == 0x0 and not r.mmio_exit_records, f"expected #PF(not present), no exit; got {r}"


def _shadow_mmio(flags: int, pkey: int = 0) -> Guest:
    g = Guest("shadow")
    g.pt.map(0x40_0000, MMIO, flags=flags, pkey=pkey)
    g.vcpu.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    return g


def test_mmio_implicit_access_at_cpl3_is_a_supervisor_access() -> None:
    """SDM Vol. 3A 4.6: implicit accesses (GDT, IDT, TSS...) are supervisor accesses at any CPL.
    On a supervisor MMIO page at CPL3 the model's emulator walks with U=1 and injects #PF(0x5)."""
    g = _shadow_mmio(P | RW | A | D)
    r = g.vcpu.access(0x40_0000, 4, "read", cpl=3, implicit=True)
    assert r.fault is None and [e.phys_addr for e in r.mmio_exit_records] == [MMIO], \
        f"expected one MMIO read exit, got {r}"


def test_mmio_smap_applies_to_implicit_accesses_even_with_ac() -> None:
    """SDM Vol. 3A 4.6: with CR4.SMAP, an implicit supervisor access to a user page faults whatever
    EFLAGS.AC says.  Once an MMIO spte exists, the model's emulator checks SMAP with AC only."""
    g = _shadow_mmio(P | RW | US | A | D)
    v = g.vcpu
    v.set_sregs(cr4=X86_CR4_PAE | X86_CR4_SMAP, rflags=X86_EFLAGS_AC)
    assert v.access(0x40_0000, 4, "read", cpl=0).mmio_exit_records                 # explicit, AC=1: allowed
    r = v.access(0x40_0000, 4, "read", cpl=0, implicit=True)
    assert pf(r) == 0x1 and not r.mmio_exit_records, f"expected #PF(0x1), no exit; got {r}"


def test_mmio_fetch_respects_nx() -> None:
    """SDM Vol. 3A 4.6: with EFER.NXE, an instruction fetch from a page with XD=1 faults, error code
    P|I/D.  After a load has created the MMIO spte, the model's fast path + emulator lets the fetch
    through (the emulator walks without the fetch bit)."""
    g = _shadow_mmio(P | RW | A | D | NX)
    v = g.vcpu
    assert v.access(0x40_0000, 4, "read").mmio_exit_records
    r = v.access(0x40_0000, 4, "fetch")
    assert pf(r) == 0x11 and not r.mmio_exit_records, f"expected #PF(0x11), no exit; got {r}"


def test_mmio_access_respects_pkru() -> None:
    """SDM Vol. 3A 4.6.2: with CR4.PKE, a data access to a user page whose key has PKRU.AD set faults
    with PK in the error code.  Once the MMIO spte exists the model's emulator never looks at PKRU."""
    g = _shadow_mmio(P | RW | US | A | D, pkey=1)
    v = g.vcpu
    v.set_sregs(cr4=X86_CR4_PAE | X86_CR4_PKE, pkru=0)
    assert v.access(0x40_0000, 4, "read", cpl=3).mmio_exit_records
    v.pkru = 0b0100                                  # AD for key 1 (WRPKRU)
    r = v.access(0x40_0000, 4, "read", cpl=3)
    assert pf(r) == 0x25 and not r.mmio_exit_records, f"expected #PF(P|U|PK = 0x25), no exit; got {r}"


@pytest.mark.parametrize("policy", ["zap", "generation"])
def test_write_to_an_mmio_page_sets_the_dirty_bit_with_cr0_wp_clear(policy: str) -> None:
    """SDM Vol. 3A 4.8: a write through a paging entry sets its D bit, whatever CR0.WP.  A read of an
    MMIO page caches its rights without W (its PTE is clean: protect_clean_gpte); with CR0.WP=0 the
    following supervisor write passed the emulator's check of those rights and never walked, so D
    stayed 0.  Found by the fuzzer (PAE guest, write to the APIC page)."""
    g = Guest("shadow", mmio_caching=policy)
    pte = g.pt.map(0x40_0000, MMIO, flags=P | RW | A)
    v = g.vcpu
    v.set_sregs(cr3=g.pt.cr3, **{**LONG_MODE, "cr0": LONG_MODE["cr0"] & ~X86_CR0_WP})
    assert v.access(0x40_0000, 4, "read").mmio_exit_records
    r = v.access(0x40_0008, 4, "write", 5)
    assert r.fault is None and [e.phys_addr for e in r.mmio_exit_records] == [MMIO + 8]
    assert int.from_bytes(g.vm.read_phys(pte, 8), "little") & D, "the write did not set the PTE's D bit"


@pytest.mark.parametrize("mmu", ["shadow", "ept", "npt"])
def test_page_crossing_fetch_fault_reports_the_fetch(mmu: str) -> None:
    """SDM Vol. 3A 4.7: the #PF error code of an instruction fetch has I/D set (with EFER.NXE or
    CR4.SMEP).  When a fetch crosses from an MMIO page into a not-present one, the model's emulator
    walks the second page as a data read and reports #PF(0x0)."""
    g = Guest(mmu)
    g.pt.map(0x40_0000, MMIO, flags=P | RW | A | D)                      # the next page is not mapped
    g.vcpu.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    r = g.vcpu.access(0x40_0FFC, 8, "fetch")
    assert pf(r) == 0x10 and r.fault.cr2 == 0x40_1000, f"expected #PF(I/D = 0x10) at 0x401000, got {r}"


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_page_crossing_implicit_access_at_cpl3_is_a_supervisor_access(mmu: str) -> None:
    """SDM Vol. 3A 4.6: an implicit access is a supervisor access at any CPL.  Crossing from a supervisor
    RAM page into a supervisor MMIO page at CPL3, the model's emulator walks with U=1 and injects
    #PF(P|U) instead of completing the access."""
    g = Guest(mmu)
    g.pt.map(0x40_0000, 0x50_0000, flags=P | RW | A | D)
    g.pt.map(0x40_1000, MMIO, flags=P | RW | A | D)
    g.vm.write_phys(0x50_0FFC, b"\x01\x02\x03\x04")
    g.vcpu.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    r = g.vcpu.access(0x40_0FFC, 8, "read", cpl=3, implicit=True)
    assert r.fault is None and r.value == 0x77_04030201, f"expected value 0x7704030201 (RAM + MMIO), got {r}"


def test_faulting_page_crossing_store_writes_nothing() -> None:
    """A store that faults has no effect (SDM Vol. 3A 6.5, faults are restartable): when the second page
    of a page-crossing store faults, the first page is unchanged.  The model's emulator writes the
    first page (RAM) before walking the second (a read-only MMIO page, writable only in the stale
    MMIO spte), then injects the #PF."""
    g = Guest("shadow")
    g.pt.map(0x40_0000, 0x50_0000, flags=P | RW | A | D)
    g.pt.map(0x40_1000, MMIO, flags=P | A | D)                          # read-only MMIO page
    g.vm.write_phys(0x50_0FFC, b"\x01\x02\x03\x04")
    v = g.vcpu
    v.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    assert v.access(0x40_1000, 4, "read").mmio_exit_records                          # MMIO spte + cache
    r = v.access(0x40_0FFC, 8, "write", 0xAAAAAAAA_BBBBBBBB)
    assert pf(r) == 0x3, r
    assert g.vm.read_phys(0x50_0FFC, 4) == b"\x01\x02\x03\x04", "the faulting store modified the first page"


# ------------------------------------------------------------------------------------------------
# 4. Linear-address checks.
@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_32bit_access_crossing_4gib_is_a_gp_with_no_side_effect(mmu: str) -> None:
    """A 32-bit guest's flat segments end at 4 GiB: an access whose last byte lies beyond is a #GP(0)
    (segment limit) and changes nothing.  The model raises InvalidArgument (an API error for a
    valid gva) after its walk of the first page has already set the A bit."""
    g = Guest(mmu, "32bit")
    pte = g.pt.map(0xFFFF_F000, 0x50_0000, flags=P | RW)
    g.vcpu.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr3=g.pt.cr3, cr4=X86_CR4_PSE, efer=0)
    r = g.vcpu.access(0xFFFF_FFFC, 8, "read")
    assert r.fault is not None and r.fault.vector == 13, r
    assert int.from_bytes(g.vm.read_phys(pte, 4), "little") == 0x50_0000 | P | RW, "A bit set by a #GP access"


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_non_canonical_last_byte_is_a_gp_before_any_page_fault(mmu: str) -> None:
    """SDM Vol. 3A 3.3.7.1 / 6.15: a 64-bit access whose bytes are not all canonical raises #GP(0);
    the canonicality check (linear-address formation) comes before paging.  The model translates
    the first page first and reports its #PF."""
    g = Guest(mmu)
    g.vcpu.set_sregs(cr3=g.pt.cr3, **LONG_MODE)      # 0x7fff_ffff_f000 is not mapped
    r = g.vcpu.access(0x7FFF_FFFF_FFFC, 8, "read")
    assert r.fault is not None and r.fault.vector == 13, f"expected #GP(0), got {r}"


# ------------------------------------------------------------------------------------------------
# 5. Shadow pages shared across different guest paging configurations.
def test_shadow_pages_are_not_shared_between_vcpus_with_different_efer_nxe() -> None:
    """SDM Vol. 3A 4.5 (Table 4-20): with EFER.NXE=0, bit 63 of a paging entry is reserved, so a walk
    through an entry with XD=1 faults with P|RSVD.  vCPU B (NXE=0) has never translated the page;
    the model lets it use the spte vCPU A (NXE=1) built (KVM forces root_role.efer_nx=1 for
    shadow paging, so both vCPUs share the shadow page) and B reads the data."""
    g = Guest("shadow")
    g.pt.map(0x40_0000, 0x50_0000, flags=P | RW | A | D | NX)
    g.vm.write_phys(0x50_0000, DATA.to_bytes(8, "little"))
    a, b = g.vcpu, g.vm.create_vcpu()
    a.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    b.set_sregs(cr3=g.pt.cr3, **{**LONG_MODE, "efer": EFER_LME})
    assert a.access(0x40_0000, 8, "read").value == DATA
    r = b.access(0x40_0000, 8, "read")
    assert pf(r) == 0x9, f"expected #PF(P|RSVD = 0x9) for the NXE=0 vCPU, got {r}"


# ------------------------------------------------------------------------------------------------
# 6. Host memory pressure.
@pytest.mark.parametrize("mmu", ["ept", "npt"])
def test_tdp_guest_makes_progress_under_host_memory_pressure(mmu: str) -> None:
    """The guest cannot tell how much memory the host has (only by timing), and nothing a guest does
    crashes the model.  With EPT/NPT the CPU's 2-D walk needs the guest's four table pages and the
    data page mapped at once; on a host with room for fewer, the model swaps out (and zaps) one of
    them on every fault-in of another, and vcpu.access raises KvmBug("... faulted 64 times without
    progress").  Shadow paging, on the same host, completes."""
    host = kvmmu.Host(memory_limit=4 << 20, reserved=(4 << 20) - (8 << 12))    # 8 pages left
    vm = kvmmu.VM(mmu=mmu, host=host)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=POOL)
    pt.map(0x40_0000, 0x40_0000, flags=P | RW)
    vm.write_phys(0x40_0000, DATA.to_bytes(8, "little"))
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert vcpu.access(0x40_0000, 8, "read").value == DATA


# ------------------------------------------------------------------------------------------------
# 7. KVM's own reads of guest memory under mmu_lock.
def test_resync_of_an_unsync_spte_never_swaps_in_under_the_mmu_lock() -> None:
    """KVM re-reads a gpte of an unsync page with kvm_vcpu_read_guest_atomic under mmu_lock
    (FNAME(sync_spte)): a host page that is not resident is a failed read, never a swap-in.  The
    model swapped the table page in, whose reclaim ran the MMU notifier, which dropped the very
    spte being resynced; the resync then wrote it back from its stale copy, present but with no
    rmap entry (vm.audit: "gfn ... is mapped but has no rmap entry").  Found by the fuzzer on a host
    with 16 free pages; these are its minimised steps (the state machine is deterministic)."""
    from tests.fuzz.machine import machine_for
    state = machine_for("shadow", "off")()
    state.setup(mode="5level", near_wrap=False, b_policy="off", seed=750, b_flavour="npt", b_mode="4level",
                host_pages=16, quota=None)
    state.access(cpl=1, implicit=False, kind="fetch", off=2048, size=16, value=943, vi=1, where=255, wi=1)
    state.access(cpl=0, implicit=False, kind="read", off=4080, size=4, value=1, vi=1, where=204, wi=0)
    state.cpu_control(arg=4, op="pge", vi=1, wi=0)
    state.access(cpl=3, implicit=False, kind="fetch", off=8, size=1, value=18842, vi=1, where=29, wi=0)
    state.mmu_is_healthy()


def test_shadow_pages_are_not_shared_between_32bit_vcpus_with_different_cr4_pse() -> None:
    """SDM Vol. 3A 4.3: with CR4.PSE=0 a 32-bit PDE's bit 7 is ignored and the PDE points to a page
    table; with PSE=1 it maps a 4 MiB page.  vCPU B (PSE=0) ran on the shadow pages vCPU A (PSE=1)
    built, so it reached the 4 MiB page where its own walk reads a page table at the frame (here at a
    gpa with no memslot: #PF, P=0).  Found by the fuzzer (KVM's page role has no PSE bit either;
    with kvm_deviations the model shares them as KVM does)."""
    g = Guest("shadow", "32bit")
    g.vm.write_phys(g.pt.cr3 + 4, (MMIO | P | RW | A | D | 0x80).to_bytes(4, "little"))   # PDE[1]: 4 MiB
    a, b = g.vcpu, g.vm.create_vcpu()
    a.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr3=g.pt.cr3, cr4=X86_CR4_PSE, efer=0)
    b.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr3=g.pt.cr3, cr4=0, efer=0)
    assert a.access(0x40_0000, 4, "read").mmio_exit_records
    r = b.access(0x40_0000, 4, "read")
    assert pf(r) == 0x0 and not r.mmio_exit_records, f"expected #PF(not present) for the PSE=0 vCPU, got {r}"
