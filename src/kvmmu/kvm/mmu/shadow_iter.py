"""KVM's one iterator over its own tables from a vCPU's root (kvm_shadow_walk_iterator, mmu.c).

Every walk of KVM's tables by address goes through `ShadowWalk`: the fault paths (FNAME(fetch),
the direct map), the fast page fault, the MMIO fast path's lockless walk, INVLPG and clearing the
write-flooding counts.  The TDP MMU has its own iterator (`tdp_iter.py`); both index tables with
`arch/index.py`.

The iterator starts at the root, below a PAE root: with a 3-level root the PDPTE for the address
is read from the four-entry PAE root page and the walk starts at level 2 of the table it names, or
does not start when that PDPTE is not present (shadow_walk_init_using_root).  `okay()` computes
the entry for the current level (shadow_walk_okay); `next()` reads that entry and descends into the
table it links, or ends the walk at a leaf or a non-present entry (shadow_walk_next).  Because
`next()` reads the entry only then, a caller that links a new table at `sptep` steps into it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ...arch.bits import PAGE_SHIFT, PG_LEVEL_4K, PT32E_ROOT_LEVEL, PT64_ADDR_MASK, PT_PAGE_SIZE_MASK, PT_PRESENT_MASK
from ...arch.index import SPTE_ENT_PER_PAGE, SPTE_LEVEL_BITS, pae_root_index, spte_index
from .spte import SPTE_MMU_PRESENT_MASK

if TYPE_CHECKING:
    from .context import VcpuMmu


class ShadowWalk:
    """struct kvm_shadow_walk_iterator: `level` 0 once the walk is over."""

    __slots__ = ("read_spte", "addr", "shadow_addr", "level", "index", "sptep")

    def __init__(self, mmu: VcpuMmu, addr: int, root_hpa: int | None = None) -> None:
        read_spte = self.read_spte = mmu.kvm.read_spte
        self.addr = addr
        table = mmu.root_hpa if root_hpa is None else root_hpa
        level = mmu.root_level if table else 0
        if level == PT32E_ROOT_LEVEL:
            pdpte = read_spte(table + 8 * pae_root_index(addr))
            table = pdpte & PT64_ADDR_MASK
            level = PT32E_ROOT_LEVEL - 1 if pdpte & PT_PRESENT_MASK else 0
        self.shadow_addr = table
        self.level = level
        self.index = 0
        self.sptep = 0

    def okay(self) -> bool:
        """shadow_walk_okay: True, with `index` and `sptep` of the current level, until the walk ends."""
        if self.level < PG_LEVEL_4K:
            return False
        self.index = index = spte_index(self.addr, self.level)
        self.sptep = self.shadow_addr + 8 * index
        return True

    def next_spte(self, spte: int) -> None:
        """__shadow_walk_next: descend through `spte`, the current entry's value."""
        if not spte & SPTE_MMU_PRESENT_MASK or self.level == PG_LEVEL_4K or spte & PT_PAGE_SIZE_MASK:
            self.level = 0
            return
        self.shadow_addr = spte & PT64_ADDR_MASK
        self.level -= 1

    def next(self) -> None:
        """shadow_walk_next: descend through the current entry as it is now."""
        self.next_spte(self.read_spte(self.sptep))

    def next_okay(self) -> bool:
        """shadow_walk_next, then shadow_walk_okay: the fault paths' step, in one call per level
        (spte_index inlined; the fault paths take it once per level of every fault)."""
        spte = self.read_spte(self.sptep)
        level = self.level
        if not spte & SPTE_MMU_PRESENT_MASK or level == PG_LEVEL_4K or spte & PT_PAGE_SIZE_MASK:
            self.level = 0
            return False
        self.level = level = level - 1
        self.index = index = (self.addr >> (PAGE_SHIFT + SPTE_LEVEL_BITS * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)
        self.shadow_addr = table = spte & PT64_ADDR_MASK
        self.sptep = table + 8 * index
        return True


def for_each_shadow_entry(mmu: VcpuMmu, addr: int, root_hpa: int | None = None) -> Iterator[ShadowWalk]:
    """for_each_shadow_entry(_using_root): the iterator at each level, stepping after the body."""
    it = ShadowWalk(mmu, addr, root_hpa)
    while it.okay():
        yield it
        it.next()


def for_each_shadow_entry_lockless(mmu: VcpuMmu, addr: int,
                                   root_hpa: int | None = None) -> Iterator[tuple[ShadowWalk, int]]:
    """for_each_shadow_entry_lockless: (iterator, spte) from the root down, each entry read once."""
    it = ShadowWalk(mmu, addr, root_hpa)
    while it.okay():
        spte = it.read_spte(it.sptep)
        yield it, spte
        it.next_spte(spte)
