"""The TDP MMU's one iterator over a paging structure (KVM's tdp_iter.[ch]).

A pre-order walk of the sptes of one root that cover the gfns [start, end): at each step the
iterator holds `level`, `gfn` (the first gfn the entry maps), `sptep` and `old_spte` (the value it
read).  It descends into a present non-leaf spte unless `min_level` is reached, else moves to the
next entry of the table, climbing when a table is done.  The TDP MMU uses it for everything: the
fault path (map), zapping, aging, dirty logging and the lockless walk of the MMIO fast path.

A caller that changes the spte under the iterator stores the new value in `old_spte` (as
tdp_mmu_set_spte does): the iterator then steps down into a freshly linked table, or past a zapped
one, without re-reading.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ...arch.bits import PT_PAGE_SIZE_MASK
from ...arch.index import SPTE_ENT_PER_PAGE, pfn_to_hpa, round_gfn_for_level
from ...arch.index import gfn_index as spte_index
from ...arch.index import pages_per_hpage as pages_per_level
from .spte import SPTE_MMU_PRESENT_MASK, spte_to_pfn

if TYPE_CHECKING:
    from ...hw.memory import SparseMemory as Memory

__all__ = ["SPTE_ENT_PER_PAGE", "TdpIter", "for_each_tdp_pte", "pages_per_level", "round_gfn_for_level",
           "spte_index"]


class TdpIter:
    """struct tdp_iter."""

    __slots__ = ("mem", "root_level", "min_level", "pt_path", "level", "gfn", "next_last_level_gfn", "sptep",
                 "old_spte", "valid", "as_id")

    def __init__(self, mem: Memory, root_hpa: int, root_level: int, min_level: int, start_gfn: int,
                 as_id: int = 0) -> None:
        self.mem = mem
        self.root_level = root_level
        self.min_level = min_level
        self.as_id = as_id
        self.pt_path = [0] * (root_level + 1)
        self.pt_path[root_level] = root_hpa
        self.next_last_level_gfn = start_gfn
        self.level = root_level
        self.valid = True
        self.gfn = round_gfn_for_level(start_gfn, root_level)
        self._refresh_sptep()

    def _refresh_sptep(self) -> None:
        self.sptep = self.pt_path[self.level] + 8 * spte_index(self.gfn, self.level)
        self.old_spte = self.mem.read(self.sptep, 8)

    def _try_step_down(self) -> bool:
        if self.level == self.min_level:
            return False
        spte = self.old_spte
        if not spte & SPTE_MMU_PRESENT_MASK or spte & PT_PAGE_SIZE_MASK or self.level == 1:
            return False
        self.level -= 1
        self.pt_path[self.level] = pfn_to_hpa(spte_to_pfn(spte))
        self.gfn = round_gfn_for_level(self.next_last_level_gfn, self.level)
        self._refresh_sptep()
        return True

    def _try_step_side(self) -> bool:
        if spte_index(self.gfn, self.level) == SPTE_ENT_PER_PAGE - 1:
            return False
        self.gfn += pages_per_level(self.level)
        self.next_last_level_gfn = self.gfn
        self.sptep += 8
        self.old_spte = self.mem.read(self.sptep, 8)
        return True

    def _try_step_up(self) -> bool:
        if self.level == self.root_level:
            return False
        self.level += 1
        self.gfn = round_gfn_for_level(self.gfn, self.level)
        self._refresh_sptep()
        return True

    def next(self) -> None:
        """tdp_iter_next: down if possible, else sideways, climbing as tables end."""
        if self._try_step_down():
            return
        while True:
            if self._try_step_side():
                return
            if not self._try_step_up():
                self.valid = False
                return


def for_each_tdp_pte(mem: Memory, root_hpa: int, root_level: int, start: int, end: int, min_level: int = 1,
                     as_id: int = 0) -> Iterator[TdpIter]:
    """for_each_tdp_pte_min_level: yields the one iterator at each spte covering [start, end)."""
    it = TdpIter(mem, root_hpa, root_level, min_level, start, as_id)
    while it.valid and it.gfn < end:
        yield it
        it.next()
