"""Page frame numbers and table indices (arch/index.py) against the SDM's address layout.

SDM Vol. 3A 4.5 (Figure 4-8/4-9): a 4-level linear address is PML4 bits 47:39, PDPT 38:30, PD
29:21, PT 20:12, offset 11:0; 5-level adds PML5 bits 56:48; PAE's PDPT index is bits 31:30
(4.4.1); a 4 KiB frame number is the address without its low 12 bits.
"""

from __future__ import annotations

import pytest

from kvmmu.arch.index import (
    gfn_index,
    gfn_to_gpa,
    gpa_to_gfn,
    hpa_to_pfn,
    pae_root_index,
    pages_per_hpage,
    pfn_to_hpa,
    round_gfn_for_level,
    spte_index,
    spte_level_shift,
)

# An address built from its fields: PML4 255, PDPT 0x1AF, PD 0x06F, PT 0x0F1, offset 0x234.
ADDR = (255 << 39) | (0x1AF << 30) | (0x06F << 21) | (0x0F1 << 12) | 0x234


@pytest.mark.parametrize(("level", "index"), [(1, 0x0F1), (2, 0x06F), (3, 0x1AF), (4, 255), (5, 0)])
def test_spte_index_is_the_sdm_field(level: int, index: int) -> None:
    assert spte_index(ADDR, level) == index
    assert gfn_index(ADDR >> 12, level) == index


def test_pml5_index_is_bits_56_48() -> None:
    assert spte_index(0x1F5 << 48, 5) == 0x1F5
    assert spte_index(0x1F5 << 48, 4) == 0


def test_level_shift_and_reach() -> None:
    assert [spte_level_shift(lv) for lv in (1, 2, 3, 4, 5)] == [12, 21, 30, 39, 48]
    # A 2 MiB page is 512 4 KiB pages, a 1 GiB page 262,144 (SDM 4.5: PDE/PDPTE with PS=1).
    assert [pages_per_hpage(lv) for lv in (1, 2, 3)] == [1, 512, 262144]


def test_round_gfn_for_level() -> None:
    assert round_gfn_for_level(0x12345, 1) == 0x12345
    assert round_gfn_for_level(0x12345, 2) == 0x12200
    assert round_gfn_for_level(0x12345, 3) == 0
    assert round_gfn_for_level(0x7FFFF, 3) == 0x40000


@pytest.mark.parametrize(("addr", "index"), [(0, 0), (0x3FFFFFFF, 0), (0x40000000, 1), (0xBFFFFFFF, 2),
                                             (0xFFFFF000, 3)])
def test_pae_pdpt_index_is_bits_31_30(addr: int, index: int) -> None:
    assert pae_root_index(addr) == index


def test_frame_numbers() -> None:
    assert gpa_to_gfn(0xFEE00ABC) == 0xFEE00
    assert gfn_to_gpa(0xFEE00) == 0xFEE00000
    assert hpa_to_pfn((1 << 51) | 0xFFF) == 1 << 39
    assert pfn_to_hpa(1 << 39) == 1 << 51
