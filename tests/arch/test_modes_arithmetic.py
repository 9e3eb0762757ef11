"""Address arithmetic of each paging mode, on hand-built tables.

Every expected value is worked out by hand from the SDM (Vol. 3A chapter 4, Vol. 3C chapter 29 for
EPT): which address bits index which level, which entry bits are frame bits and which are reserved,
and what a fault reports.  Each test checks one rule, stated in its docstring.
"""

from __future__ import annotations

import pytest

from kvmmu.arch import PagingContext, walk
from kvmmu.arch.bits import PFERR_FETCH_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK
from kvmmu.errors import InvalidArgument
from kvmmu.hw.memory import SparseMemory

PF, GP, EPT_VIOLATION, EPT_MISCONFIG = 14, 13, 48, 49
W, U, F = PFERR_WRITE_MASK, PFERR_USER_MASK, PFERR_FETCH_MASK
PRW_U = 0x7                  # P | R/W | U/S
PS = 0x80
A_BIT, D_BIT = 0x20, 0x40

# --------------------------------------------------------------------------------------------
# 4-level paging.  LA 0xFFFF_D2B1_E563_D9F8: PML4 index (47:39) 0x1A5, PDPT index (38:30) 0x0C7,
# PD index (29:21) 0x12B, PT index (20:12) 0x03D, offset 0x9F8; bits 63:48 copy bit 47 (=1).
LA4 = 0xFFFF_D2B1_E563_D9F8
PML4, PDPT, PD, PT = 0x10_0000, 0x20_3000, 0x30_5000, 0x40_7000
FRAME4K = 0x3_4567_8000


def memory(entries: dict[int, int], size: int = 8) -> SparseMemory:
    mem = SparseMemory()
    for addr, value in entries.items():
        mem.write(addr, size, value)
    return mem


def tables4(pte: int = FRAME4K | PRW_U, pde: int = PT | PRW_U, pdpte: int = PD | PRW_U,
            pml4e: int = PDPT | PRW_U) -> SparseMemory:
    return memory({PML4 + 8 * 0x1A5: pml4e, PDPT + 8 * 0x0C7: pdpte, PD + 8 * 0x12B: pde,
                   PT + 8 * 0x03D: pte})


def ctx4(**kw: object) -> PagingContext:
    return PagingContext("4level", **kw)  # type: ignore[arg-type]


def test_4level_4k_page_uses_9_bit_indexes_and_12_bit_offset() -> None:
    """4-level paging: bits 47:39, 38:30, 29:21, 20:12 index the PML4, PDPT, PD and PT; the page
    frame comes from PTE bits M-1:12 and the offset from LA bits 11:0."""
    w = walk(ctx4(), tables4(), PML4, LA4, 0)
    assert (w.fault, w.gpa, w.level) == (0, 0x3_4567_89F8, 1)


def test_cr3_low_bits_do_not_move_the_pml4() -> None:
    """CR3 bits 11:0 (PWT, PCD, or a PCID) are not part of the PML4 address."""
    w = walk(ctx4(), tables4(), PML4 | 0x018, LA4, 0)
    assert (w.fault, w.gpa) == (0, 0x3_4567_89F8)


def test_4level_2m_page() -> None:
    """A PDE with PS=1 maps a 2 MiB page: frame bits M-1:21 of the PDE, offset LA bits 20:0."""
    w = walk(ctx4(), tables4(pde=0x3_4560_0000 | PS | PRW_U), PML4, LA4, 0)
    assert (w.fault, w.gpa, w.level) == (0, 0x3_4563_D9F8, 2)


def test_2m_page_bit_12_is_pat_not_an_address_bit() -> None:
    """In a 2 MiB PDE, bit 12 is PAT; it is neither a frame bit nor reserved."""
    w = walk(ctx4(), tables4(pde=0x3_4560_1000 | PS | PRW_U), PML4, LA4, 0)
    assert (w.fault, w.gpa) == (0, 0x3_4563_D9F8)


def test_2m_page_bit_13_is_reserved() -> None:
    """Bits 20:13 of a 2 MiB PDE are reserved: a read faults with P|RSVD (0x9)."""
    w = walk(ctx4(), tables4(pde=0x3_4560_2000 | PS | PRW_U), PML4, LA4, 0)
    assert (w.fault, w.error_code) == (PF, 0x9)


def test_4level_1g_page() -> None:
    """A PDPTE with PS=1 maps a 1 GiB page: frame bits M-1:30, offset LA bits 29:0."""
    w = walk(ctx4(gbpages=True), tables4(pdpte=0x3_4000_0000 | PS | PRW_U), PML4, LA4, 0)
    assert (w.fault, w.gpa, w.level) == (0, 0x3_6563_D9F8, 3)


def test_1g_page_without_gbpages_is_reserved() -> None:
    """Without 1 GiB page support, PS in a PDPTE is a reserved bit: a write faults with P|W|RSVD."""
    w = walk(ctx4(gbpages=False), tables4(pdpte=0x3_4000_0000 | PS | PRW_U), PML4, LA4, W)
    assert (w.fault, w.error_code) == (PF, 0xB)


def test_1g_page_bits_29_13_are_reserved() -> None:
    """Bits 29:13 of a 1 GiB PDPTE are reserved (bit 13 here)."""
    w = walk(ctx4(), tables4(pdpte=0x3_4000_2000 | PS | PRW_U), PML4, LA4, 0)
    assert (w.fault, w.error_code) == (PF, 0x9)


def test_ps_in_a_pml4e_is_reserved() -> None:
    """PS (bit 7) is reserved in a PML4E: a user read faults with P|U|RSVD (0xD)."""
    w = walk(ctx4(), tables4(pml4e=PDPT | PS | PRW_U), PML4, LA4, U)
    assert (w.fault, w.error_code) == (PF, 0xD)


def test_bits_62_52_are_ignored_in_4level_entries() -> None:
    """4-level paging ignores PTE bits 62:52 (with CR4.PKE=0 bits 62:59 are not a key either)."""
    w = walk(ctx4(), tables4(pte=FRAME4K | (0x7FF << 52) | PRW_U), PML4, LA4, W)
    assert (w.fault, w.gpa) == (0, 0x3_4567_89F8)


def test_nonleaf_d_bit_is_ignored_and_success_sets_a_everywhere_d_on_the_leaf() -> None:
    """A write that succeeds sets A in every entry it used and D only in the leaf; D (bit 6) of a
    non-leaf entry is ignored (a preset D there neither faults nor changes)."""
    mem = tables4(pde=PT | D_BIT | PRW_U)
    w = walk(ctx4(), mem, PML4, LA4, W)
    assert w.fault == 0
    assert mem.read(PML4 + 8 * 0x1A5, 8) == PDPT | A_BIT | PRW_U
    assert mem.read(PDPT + 8 * 0x0C7, 8) == PD | A_BIT | PRW_U
    assert mem.read(PD + 8 * 0x12B, 8) == PT | A_BIT | D_BIT | PRW_U
    assert mem.read(PT + 8 * 0x03D, 8) == FRAME4K | A_BIT | D_BIT | PRW_U


def test_pte_access_is_the_and_of_all_levels() -> None:
    """The rights of a translation are the AND of every level: here R/W=0 in the PDE, XD=1 in the
    PTE (NXE=1), U=1 everywhere, so the translation allows user (4) only: no write, no execute."""
    w = walk(ctx4(nxe=True), tables4(pde=PT | 0x5, pte=FRAME4K | (1 << 63) | PRW_U), PML4, LA4, 0)
    assert (w.fault, w.pte_access) == (0, 0o4)


# --------------------------------------------------------------------------------------------
# MAXPHYADDR.
def test_bit_45_is_an_address_bit_with_maxphyaddr_46() -> None:
    """With MAXPHYADDR=46, PTE bits 45:12 are the frame: bit 45 reaches the physical address."""
    w = walk(ctx4(maxphyaddr=46), tables4(pte=(1 << 45) | 0x5000 | PRW_U), PML4, LA4, 0)
    assert (w.fault, w.gpa) == (0, 0x2000_0000_59F8)


def test_bit_46_is_reserved_with_maxphyaddr_46() -> None:
    """With MAXPHYADDR=46, bits 51:46 are reserved: a fetch faults with P|RSVD, and I/D with NXE=1."""
    w = walk(ctx4(maxphyaddr=46, nxe=True), tables4(pte=(1 << 46) | 0x5000 | PRW_U), PML4, LA4, F)
    assert (w.fault, w.error_code) == (PF, 0x19)


def test_bit_51_is_reserved_with_maxphyaddr_46() -> None:
    """With MAXPHYADDR=46, bit 51 of a PDE is reserved: P|RSVD."""
    w = walk(ctx4(maxphyaddr=46), tables4(pde=(1 << 51) | PT | PRW_U), PML4, LA4, 0)
    assert (w.fault, w.error_code) == (PF, 0x9)


def test_bit_51_is_an_address_bit_with_maxphyaddr_52() -> None:
    """With MAXPHYADDR=52 nothing in 51:12 is reserved: PTE bit 51 is a frame bit."""
    w = walk(ctx4(maxphyaddr=52), tables4(pte=(1 << 51) | 0x5000 | PRW_U), PML4, LA4, 0)
    assert (w.fault, w.gpa) == (0, 0x8_0000_0000_59F8)


def test_bit_51_of_a_table_pointer_with_maxphyaddr_52() -> None:
    """With MAXPHYADDR=52, bit 51 of a PDE is part of the page-table address."""
    high_pt = (1 << 51) | PT
    mem = tables4()
    mem.write(PD + 8 * 0x12B, 8, high_pt | PRW_U)
    mem.write(high_pt + 8 * 0x03D, 8, 0x7_7700_0000 | PRW_U)
    w = walk(ctx4(maxphyaddr=52), mem, PML4, LA4, 0)
    assert (w.fault, w.gpa) == (0, 0x7_7700_09F8)


# --------------------------------------------------------------------------------------------
# Canonical addresses and LA57.
@pytest.mark.parametrize("la", [0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_F000, 0x00FF_8000_0000_0000,
                                0x8000_0000_0000_0000])
def test_noncanonical_address_in_4level_is_gp(la: int) -> None:
    """4-level paging: bits 63:48 must equal bit 47, else the access raises #GP, not #PF."""
    w = walk(ctx4(), tables4(), PML4, la, 0)
    assert w.fault == GP


def test_canonical_unmapped_upper_half_address_is_a_not_present_pf() -> None:
    """A canonical upper-half address with an empty PML4 slot raises #PF with P=0 (code 0)."""
    w = walk(ctx4(), tables4(), PML4, 0xFFFF_8000_0000_0000, 0)
    assert (w.fault, w.error_code) == (PF, 0)


PML5 = 0x50_0000
# LA57: bits 56:48 index the PML5.  0x00A3_D2B1_E563_D9F8: PML5 index 0x0A3 and the 4-level indexes
# above; bits 63:57 copy bit 56 (=0).  Under 4-level paging it is not canonical (bits 63:48 = 0x00A3).
LA5 = 0x00A3_D2B1_E563_D9F8


def tables5(pml5_index: int = 0x0A3, pml5e: int = PML4 | PRW_U) -> SparseMemory:
    mem = tables4()
    mem.write(PML5 + 8 * pml5_index, 8, pml5e)
    return mem


def test_la57_indexes_the_pml5_with_bits_56_48() -> None:
    """5-level paging: LA bits 56:48 select the PML5E; the rest is the 4-level walk."""
    w = walk(PagingContext("5level"), tables5(), PML5, LA5, 0)
    assert (w.fault, w.gpa, w.level) == (0, 0x3_4567_89F8, 1)


def test_la57_wrong_pml5_slot_is_not_present() -> None:
    """Only the PML5E selected by bits 56:48 is used: with index 0x0A3 empty, a read faults P=0."""
    w = walk(PagingContext("5level"), tables5(pml5_index=0x0A2), PML5, LA5, 0)
    assert (w.fault, w.error_code, w.level) == (PF, 0, 5)


def test_address_canonical_under_la57_but_not_4level() -> None:
    """0x00A3_xxxx is canonical with 57-bit addresses (63:57 = bit 56 = 0) but not with 48-bit ones."""
    assert walk(ctx4(), tables5(), PML4, LA5, 0).fault == GP
    assert walk(PagingContext("5level"), tables5(), PML5, LA5, 0).fault == 0


def test_la57_upper_half_uses_pml5_index_with_bit_56() -> None:
    """0xFFA3_D2B1_E563_D9F8: bit 56 = 1 is part of the PML5 index (0x1A3); bits 63:57 copy it."""
    w = walk(PagingContext("5level"), tables5(pml5_index=0x1A3), PML5, 0xFFA3_D2B1_E563_D9F8, 0)
    assert (w.fault, w.gpa) == (0, 0x3_4567_89F8)


@pytest.mark.parametrize("la", [0x0100_0000_0000_0000, 0xFE00_0000_0000_0000, 0x8000_0000_0000_0000])
def test_noncanonical_address_in_5level_is_gp(la: int) -> None:
    """5-level paging: bits 63:57 must equal bit 56, else #GP."""
    assert walk(PagingContext("5level"), tables5(), PML5, la, 0).fault == GP


def test_ps_in_a_pml5e_is_reserved() -> None:
    """PS is reserved in a PML5E: a read faults with P|RSVD."""
    w = walk(PagingContext("5level"), tables5(pml5e=PML4 | PS | PRW_U), PML5, LA5, 0)
    assert (w.fault, w.error_code) == (PF, 0x9)


# --------------------------------------------------------------------------------------------
# PAE paging.  LA_i = i << 30 | 0x1B3 << 21 | 0x0C9 << 12 | 0x5A4: PDPTE index (31:30) i, PD index
# (29:21) 0x1B3, PT index (20:12) 0x0C9.  CR3 = 0x60_0038: the PDPT is at CR3 & ~0x1F = 0x60_0020.
PAE_CR3 = 0x0060_0038
PDPT_PAE = 0x0060_0020


def pae_tables(pdpte3: int | None = None) -> SparseMemory:
    """Four PDPTEs, each to its own PD -> PT -> frame 0x1_0000_0000 + i * 0x10_0000."""
    mem = SparseMemory()
    for i in range(4):
        pd, pt = 0x70_0000 + 0x1000 * i, 0x80_0000 + 0x1000 * i
        mem.write(PDPT_PAE + 8 * i, 8, pd | 1)
        mem.write(pd + 8 * 0x1B3, 8, pt | PRW_U)
        mem.write(pt + 8 * 0x0C9, 8, (0x1_0000_0000 + 0x10_0000 * i) | PRW_U)
    if pdpte3 is not None:
        mem.write(PDPT_PAE + 8 * 3, 8, pdpte3)
    return mem


@pytest.mark.parametrize("i", range(4))
def test_pae_pdpte_selected_by_bits_31_30(i: int) -> None:
    """PAE paging: LA bits 31:30 select one of four PDPTEs at CR3 & ~0x1F (32-byte aligned)."""
    la = (i << 30) | (0x1B3 << 21) | (0x0C9 << 12) | 0x5A4
    w = walk(PagingContext("pae"), pae_tables(), PAE_CR3, la, 0)
    assert (w.fault, w.gpa, w.level) == (0, 0x1_0000_05A4 + 0x10_0000 * i, 1)


def test_pae_2m_page() -> None:
    """A PAE PDE with PS=1 maps 2 MiB: frame bits M-1:21 and LA bits 20:0 (0x0C95A4)."""
    mem = pae_tables()
    mem.write(0x70_3000 + 8 * 0x1B3, 8, 0x1_2340_0000 | PS | PRW_U)
    w = walk(PagingContext("pae"), mem, PAE_CR3, 0xF66C_95A4, 0)
    assert (w.fault, w.gpa, w.level) == (0, 0x1_234C_95A4, 2)


def test_pae_pdpte_not_present() -> None:
    """A PDPTE with P=0: a user write faults with W|U (0x6), P clear."""
    w = walk(PagingContext("pae"), pae_tables(pdpte3=0x70_3000), PAE_CR3, 0xF66C_95A4, W | U)
    assert (w.fault, w.error_code) == (PF, 0x6)


@pytest.mark.parametrize("bit", [1, 2, 5, 8, 63, 46])
def test_pae_pdpte_reserved_bits(bit: int) -> None:
    """PDPTE bits 2:1, 8:5, 63 and 62:MAXPHYADDR are reserved (even with NXE=1): P|RSVD."""
    mem = pae_tables(pdpte3=0x70_3000 | 1 | (1 << bit))
    w = walk(PagingContext("pae", nxe=True, maxphyaddr=46), mem, PAE_CR3, 0xF66C_95A4, 0)
    assert (w.fault, w.error_code) == (PF, 0x9)


def test_pae_pdpte_has_no_accessed_bit() -> None:
    """A successful PAE walk sets A in the PDE and PTE but never writes the PDPTE."""
    mem = pae_tables()
    w = walk(PagingContext("pae"), mem, PAE_CR3, 0xF66C_95A4, 0)
    assert w.fault == 0
    assert mem.read(PDPT_PAE + 8 * 3, 8) == 0x70_3000 | 1
    assert mem.read(0x70_3000 + 8 * 0x1B3, 8) == 0x80_3000 | A_BIT | PRW_U
    assert mem.read(0x80_3000 + 8 * 0x0C9, 8) == 0x1_0030_0000 | A_BIT | PRW_U


def test_pae_bits_62_52_are_reserved() -> None:
    """Unlike 4-level paging, PAE reserves PTE bits 62:MAXPHYADDR: bit 52 gives P|RSVD."""
    mem = pae_tables()
    mem.write(0x80_3000 + 8 * 0x0C9, 8, (1 << 52) | 0x1_0030_0000 | PRW_U)
    w = walk(PagingContext("pae"), mem, PAE_CR3, 0xF66C_95A4, 0)
    assert (w.fault, w.error_code) == (PF, 0x9)


@pytest.mark.parametrize("mode", ["32bit", "pae"])
def test_32bit_address_spaces_reject_wider_addresses(mode: str) -> None:
    """32-bit and PAE paging translate 32-bit linear addresses; a wider one is an API error."""
    with pytest.raises(InvalidArgument):
        walk(PagingContext(mode), SparseMemory(), 0x10_0000, 1 << 32, 0)


# --------------------------------------------------------------------------------------------
# 32-bit paging.  LA 0xA855_C7E4: PD index (31:22) 0x2A1, PT index (21:12) 0x15C, offset 0x7E4.
# Entries are 4 bytes.
PD32, PT32 = 0x90_0000, 0xA0_1000
LA32 = 0xA855_C7E4


def tables32(pde: int = PT32 | PRW_U, pte: int = 0x1234_5000 | PRW_U) -> SparseMemory:
    return memory({PD32 + 4 * 0x2A1: pde, PT32 + 4 * 0x15C: pte}, size=4)


def test_32bit_4k_page_uses_10_bit_indexes() -> None:
    """32-bit paging: bits 31:22 index the PD and 21:12 the PT (4-byte entries); CR3 bits 11:0 are
    not part of the PD address."""
    w = walk(PagingContext("32bit"), tables32(), PD32 | 0x18, LA32, 0)
    assert (w.fault, w.gpa, w.level) == (0, 0x1234_57E4, 1)


def test_32bit_4m_page_with_pse() -> None:
    """With CR4.PSE=1 a PDE with PS=1 maps 4 MiB: frame bits 31:22, offset LA bits 21:0."""
    w = walk(PagingContext("32bit", pse=True), tables32(pde=0x1240_0000 | PS | PRW_U), PD32, LA32, 0)
    assert (w.fault, w.gpa, w.level) == (0, 0x1255_C7E4, 2)


def test_32bit_4m_page_pse36_high_bits() -> None:
    """PSE-36: bits 16:13 of a 4 MiB PDE are physical-address bits 35:32 (0xB here)."""
    pde = 0x1240_0000 | (0xB << 13) | PS | PRW_U
    w = walk(PagingContext("32bit", pse=True), tables32(pde=pde), PD32, LA32, 0)
    assert (w.fault, w.gpa) == (0, 0xB_1255_C7E4)


@pytest.mark.parametrize("bit", [17, 21])
def test_32bit_4m_page_bits_21_17_are_reserved(bit: int) -> None:
    """A 4 MiB PDE's bits 21:17 are reserved (PSE-36 as KVM models it): a write gives P|W|RSVD."""
    pde = 0x1240_0000 | (1 << bit) | PS | PRW_U
    w = walk(PagingContext("32bit", pse=True), tables32(pde=pde), PD32, LA32, W)
    assert (w.fault, w.error_code) == (PF, 0xB)


def test_32bit_ps_is_ignored_without_cr4_pse() -> None:
    """With CR4.PSE=0, bit 7 of a PDE is ignored: the PDE still points to a page table."""
    w = walk(PagingContext("32bit", pse=False), tables32(pde=PT32 | PS | PRW_U), PD32, LA32, 0)
    assert (w.fault, w.gpa, w.level) == (0, 0x1234_57E4, 1)


def test_32bit_write_sets_a_and_d_in_4_byte_entries() -> None:
    """A successful write sets A in the PDE and A|D in the PTE, in 4-byte entries."""
    mem = tables32()
    assert walk(PagingContext("32bit"), mem, PD32, LA32, W).fault == 0
    assert mem.read(PD32 + 4 * 0x2A1, 4) == PT32 | A_BIT | PRW_U
    assert mem.read(PT32 + 4 * 0x15C, 4) == 0x1234_5000 | A_BIT | D_BIT | PRW_U


# --------------------------------------------------------------------------------------------
# EPT.  GPA 0xD2B1_E563_D9F8 uses the same indexes as LA4 (bits 47:39 ... 20:12).  Entries: R=1,
# W=2, X=4; leaf memory type in bits 5:3 (6 = WB).  The EPTP's low bits (MT, PWL, A/D) are not part
# of the address.
GPA4 = 0xD2B1_E563_D9F8
WB = 6 << 3
EPTP = PML4 | 0x5E


def ept_tables(pte: int = FRAME4K | WB | 7, pde: int = PT | 7, pdpte: int = PD | 7,
               pml4e: int = PDPT | 7) -> SparseMemory:
    return tables4(pte=pte, pde=pde, pdpte=pdpte, pml4e=pml4e)


def ept(mode: str = "ept4", **kw: object) -> PagingContext:
    return PagingContext(mode, **kw)  # type: ignore[arg-type]


def test_ept4_4k_translation() -> None:
    """4-level EPT: GPA bits 47:12 index four levels; the HPA is PTE bits M-1:12 plus GPA 11:0."""
    w = walk(ept(), ept_tables(), EPTP, GPA4, 0)
    assert (w.fault, w.gpa, w.level, w.pte_access) == (0, 0x3_4567_89F8, 1, 7)


def test_ept5_uses_gpa_bits_56_48() -> None:
    """5-level EPT: GPA bits 56:48 select the PML5E (index 0x0A3 here)."""
    mem = ept_tables()
    mem.write(PML5 + 8 * 0x0A3, 8, PML4 | 7)
    w = walk(ept("ept5"), mem, PML5 | 0x66, 0x00A3_0000_0000_0000 | GPA4, 0)
    assert (w.fault, w.gpa) == (0, 0x3_4567_89F8)


def test_ept_2m_and_1g_pages() -> None:
    """EPT PDE/PDPTE with bit 7 map 2 MiB / 1 GiB pages (frame M-1:21 / M-1:30)."""
    w = walk(ept(), ept_tables(pde=0x3_4560_0000 | 0x80 | WB | 7), EPTP, GPA4, 0)
    assert (w.fault, w.gpa, w.level) == (0, 0x3_4563_D9F8, 2)
    w = walk(ept(gbpages=True), ept_tables(pdpte=0x3_4000_0000 | 0x80 | WB | 7), EPTP, GPA4, 0)
    assert (w.fault, w.gpa, w.level) == (0, 0x3_6563_D9F8, 3)


def test_ept_1g_page_without_support_is_a_misconfiguration() -> None:
    """Without 1 GiB EPT pages, bit 7 of an EPT PDPTE is reserved: EPT misconfiguration."""
    w = walk(ept(gbpages=False), ept_tables(pdpte=0x3_4000_0000 | 0x80 | WB | 7), EPTP, GPA4, 0)
    assert w.fault == EPT_MISCONFIG


def test_ept_write_to_read_only_leaf_is_a_violation() -> None:
    """A write through entries whose RWX AND to R only (PDPTE RW, PTE R): EPT violation with
    qualification bit 1 (write) and bits 5:3 = 0b001 (readable): 0x0A."""
    w = walk(ept(), ept_tables(pdpte=PD | 3, pte=FRAME4K | WB | 1), EPTP, GPA4, W)
    assert (w.fault, w.error_code, w.pte_access) == (EPT_VIOLATION, 0x0A, 1)


def test_ept_fetch_from_non_executable_is_a_violation() -> None:
    """A fetch where the PDPTE has X=0: qualification bit 2 (fetch) | 0b011 << 3 (R, W): 0x1C."""
    w = walk(ept(), ept_tables(pdpte=PD | 3), EPTP, GPA4, F)
    assert (w.fault, w.error_code) == (EPT_VIOLATION, 0x1C)


def test_ept_read_of_read_execute_entries_succeeds() -> None:
    """A read needs R at every level only: PML4E R|X, the rest RWX."""
    w = walk(ept(), ept_tables(pml4e=PDPT | 5), EPTP, GPA4, 0)
    assert (w.fault, w.pte_access) == (0, 5)


def test_ept_write_through_read_execute_pml4e() -> None:
    """A write where the PML4E is R|X: qualification 0b010 | 0b101 << 3 = 0x2A."""
    w = walk(ept(), ept_tables(pml4e=PDPT | 5), EPTP, GPA4, W)
    assert (w.fault, w.error_code) == (EPT_VIOLATION, 0x2A)


def test_ept_not_present_leaf_reports_no_rights() -> None:
    """A read through an EPT PTE with RWX=0 is a violation: bit 0 (read), and bits 5:3 = 0 because
    the AND includes the not-present entry: qualification 0x01."""
    w = walk(ept(), ept_tables(pte=FRAME4K | WB), EPTP, GPA4, 0)
    assert (w.fault, w.error_code) == (EPT_VIOLATION, 0x01)


@pytest.mark.parametrize("where", ["pte", "pde"])
def test_ept_write_without_read_is_a_misconfiguration(where: str) -> None:
    """An EPT entry with W=1 and R=0 (leaf or not) is an EPT misconfiguration."""
    mem = ept_tables(pte=FRAME4K | WB | 2) if where == "pte" else ept_tables(pde=PT | 6)
    assert walk(ept(), mem, EPTP, GPA4, 0).fault == EPT_MISCONFIG


@pytest.mark.parametrize("mt", [2, 3, 7])
def test_ept_reserved_memory_types_are_misconfigurations(mt: int) -> None:
    """Leaf memory types 2, 3 and 7 are reserved: EPT misconfiguration."""
    assert walk(ept(), ept_tables(pte=FRAME4K | (mt << 3) | 7), EPTP, GPA4, 0).fault == EPT_MISCONFIG


@pytest.mark.parametrize("mt", [0, 1, 4, 5, 6])
def test_ept_valid_memory_types_translate(mt: int) -> None:
    """Memory types 0 (UC), 1 (WC), 4 (WT), 5 (WP), 6 (WB) are valid in a leaf."""
    w = walk(ept(), ept_tables(pte=FRAME4K | (mt << 3) | 7), EPTP, GPA4, 0)
    assert (w.fault, w.gpa) == (0, 0x3_4567_89F8)


def test_ept_address_bit_above_maxphyaddr_is_a_misconfiguration() -> None:
    """Bits 51:MAXPHYADDR of an EPT entry are reserved (bit 47 with MAXPHYADDR 46)."""
    w = walk(ept(maxphyaddr=46), ept_tables(pde=(1 << 47) | PT | 7), EPTP, GPA4, 0)
    assert w.fault == EPT_MISCONFIG


def test_ept_pml4e_bits_7_3_are_reserved() -> None:
    """Bits 7:3 of an EPT PML4E are reserved (bit 3 here): EPT misconfiguration."""
    assert walk(ept(), ept_tables(pml4e=PDPT | 0x8 | 7), EPTP, GPA4, 0).fault == EPT_MISCONFIG


def test_ept_execute_only_without_support_is_a_misconfiguration() -> None:
    """X=1, W=0, R=0 is a misconfiguration unless execute-only translations are supported."""
    assert walk(ept(), ept_tables(pte=FRAME4K | WB | 4), EPTP, GPA4, F).fault == EPT_MISCONFIG


def test_ept_execute_only_with_support() -> None:
    """With execute-only support, an X-only leaf allows a fetch; a read is a violation with
    qualification 0b001 | 0b100 << 3 = 0x21."""
    ctx = ept(ept_execonly=True)
    assert walk(ctx, ept_tables(pte=FRAME4K | WB | 4), EPTP, GPA4, F).fault == 0
    w = walk(ctx, ept_tables(pte=FRAME4K | WB | 4), EPTP, GPA4, 0)
    assert (w.fault, w.error_code) == (EPT_VIOLATION, 0x21)


def test_ept_accessed_dirty_bits_8_9_with_ad_enabled() -> None:
    """With EPT A/D enabled a write sets bit 8 (accessed) in every entry and bit 9 (dirty) in the
    leaf; a read sets only bit 8."""
    mem = ept_tables()
    assert walk(ept(ept_ad=True), mem, EPTP, GPA4, W).fault == 0
    assert mem.read(PML4 + 8 * 0x1A5, 8) == PDPT | 0x100 | 7
    assert mem.read(PD + 8 * 0x12B, 8) == PT | 0x100 | 7
    assert mem.read(PT + 8 * 0x03D, 8) == FRAME4K | 0x300 | WB | 7
    mem = ept_tables()
    assert walk(ept(ept_ad=True), mem, EPTP, GPA4, 0).fault == 0
    assert mem.read(PT + 8 * 0x03D, 8) == FRAME4K | 0x100 | WB | 7


def test_ept_without_ad_writes_nothing() -> None:
    """With EPT A/D disabled the walk never writes bits 8/9 (nor bits 5/6)."""
    mem = ept_tables()
    assert walk(ept(ept_ad=False), mem, EPTP, GPA4, W).fault == 0
    assert mem.read(PML4 + 8 * 0x1A5, 8) == PDPT | 7
    assert mem.read(PT + 8 * 0x03D, 8) == FRAME4K | WB | 7


def test_pae_cached_pdptrs_are_used_instead_of_memory() -> None:
    """PAE PDPTEs are loaded at CR3 load: with cached PDPTRs given, the walk ignores the PDPT in
    memory (here memory says PDPTE 3 is not present, the cached value points to PD 3)."""
    mem = pae_tables(pdpte3=0)
    cached = tuple(mem.read(PDPT_PAE + 8 * i, 8) for i in range(3)) + (0x70_3000 | 1,)
    w = walk(PagingContext("pae"), mem, PAE_CR3, 0xF66C_95A4, 0, pdptrs=cached)
    assert (w.fault, w.gpa) == (0, 0x1_0030_05A4)


# --------------------------------------------------------------------------------------------
# Mode selection from the control registers (SDM 4.1.1, table 4-1).
CR0_PG, CR0_WP = 1 << 31, 1 << 16
CR4_PSE, CR4_PAE, CR4_LA57, CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 4, 1 << 5, 1 << 12, 1 << 20, 1 << 21, 1 << 22
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11


@pytest.mark.parametrize(("cr0", "cr4", "efer", "mode"), [
    (0, CR4_PAE, EFER_LME, "nonpaging"),                              # CR0.PG=0: no paging
    (CR0_PG, 0, 0, "32bit"),                                          # PG=1, PAE=0
    (CR0_PG, CR4_PSE, 0, "32bit"),
    (CR0_PG, CR4_PAE, 0, "pae"),                                      # PG=1, PAE=1, LME=0
    (CR0_PG, CR4_PAE, EFER_LME | EFER_LMA, "4level"),                 # IA-32e, LA57=0
    (CR0_PG, CR4_PAE | CR4_LA57, EFER_LME | EFER_LMA, "5level"),      # IA-32e, LA57=1
])
def test_mode_selected_by_cr0_cr4_efer(cr0: int, cr4: int, efer: int, mode: str) -> None:
    """CR0.PG, CR4.PAE, EFER.LME and CR4.LA57 select no paging, 32-bit, PAE, 4-level or 5-level."""
    assert PagingContext.from_regs(cr0, cr4, efer).mode.name == mode


def test_control_bits_come_from_the_registers() -> None:
    """CR0.WP, CR4.PSE/SMEP/SMAP/PKE and EFER.NXE become the context's flags."""
    ctx = PagingContext.from_regs(CR0_PG | CR0_WP, CR4_PAE | CR4_PSE | CR4_SMEP | CR4_SMAP | CR4_PKE,
                                  EFER_LME | EFER_LMA | EFER_NXE)
    assert (ctx.wp, ctx.pse, ctx.smep, ctx.smap, ctx.pke, ctx.nxe) == (True,) * 6
    ctx = PagingContext.from_regs(CR0_PG, CR4_PAE, 0)
    assert (ctx.wp, ctx.pse, ctx.smep, ctx.smap, ctx.pke, ctx.nxe) == (False,) * 6


def test_long_mode_without_pae_is_an_error() -> None:
    """IA-32e paging requires CR4.PAE=1; CR0.PG=1 with EFER.LME=1 and PAE=0 is refused."""
    with pytest.raises(InvalidArgument):
        PagingContext.from_regs(CR0_PG, 0, EFER_LME)
