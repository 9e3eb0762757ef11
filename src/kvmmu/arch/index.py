"""Page frame numbers and table indices of the 64-bit paging structures (SDM Vol. 3A 4.5).

A 4 KiB page's frame number is its physical address shifted right by 12.  Each table of 4-level,
5-level, PAE (below the PDPT) and EPT paging holds 512 eight-byte entries, so the entry that maps an
address at `level` (1 = page table ... 5 = PML5) is 9 bits of the address starting at bit
12 + 9 * (level - 1); PAE's 4-entry PDPT is indexed by bits 31:30.  KVM's shadow and TDP tables have
the same layout, which is why both of KVM's iterators and the CPU's walks share these helpers.
Names are KVM's (gfn_to_gpa, SPTE_INDEX, KVM_PAGES_PER_HPAGE).
"""

from __future__ import annotations

from .bits import PAGE_SHIFT

SPTE_LEVEL_BITS = 9
SPTE_ENT_PER_PAGE = 1 << SPTE_LEVEL_BITS


def gfn_to_gpa(gfn: int) -> int:
    """The guest-physical address of guest frame `gfn`."""
    return gfn << PAGE_SHIFT


def gpa_to_gfn(gpa: int) -> int:
    """The guest frame holding guest-physical address `gpa`."""
    return gpa >> PAGE_SHIFT


def pfn_to_hpa(pfn: int) -> int:
    """The host-physical address of host frame `pfn`."""
    return pfn << PAGE_SHIFT


def hpa_to_pfn(hpa: int) -> int:
    """The host frame holding host-physical address `hpa` (Linux's PHYS_PFN)."""
    return hpa >> PAGE_SHIFT


def spte_level_shift(level: int) -> int:
    """SPTE_LEVEL_SHIFT: the lowest address bit that indexes a table of `level`."""
    return PAGE_SHIFT + SPTE_LEVEL_BITS * (level - 1)


def spte_index(addr: int, level: int) -> int:
    """SPTE_INDEX: which of the 512 entries of a `level` table maps `addr`."""
    return (addr >> (PAGE_SHIFT + SPTE_LEVEL_BITS * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)


def gfn_index(gfn: int, level: int) -> int:
    """spte_index of gfn_to_gpa(gfn), without building the address (the TDP MMU walks by gfn)."""
    return (gfn >> (SPTE_LEVEL_BITS * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)


def pages_per_hpage(level: int) -> int:
    """KVM_PAGES_PER_HPAGE: 4 KiB pages in one page (one entry's reach) of `level`."""
    return 1 << (SPTE_LEVEL_BITS * (level - 1))


def round_gfn_for_level(gfn: int, level: int) -> int:
    """The first gfn of the `level` page that holds gfn."""
    return gfn & -(1 << (SPTE_LEVEL_BITS * (level - 1)))


def pae_root_index(addr: int) -> int:
    """Which of PAE paging's four PDPTEs maps `addr` (bits 31:30)."""
    return (addr >> 30) & 3
