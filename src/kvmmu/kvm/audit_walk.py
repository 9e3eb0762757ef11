"""The walk over one shadow page's entries that both MMU audits share (audit.py, tdp_audit.py).

A shadow-MMU page and a TDP MMU page hold the same kinds of spte, so the rules that hold for every
spte live here once:

- an MMIO spte is a 4 KiB leaf; with MMIO caching off nothing looks like one;
- a non-leaf spte points at a shadow page of its own MMU (shadow or TDP) that records it as a parent;
- a present leaf maps the host page the memslot gives its gfn (a huge one: inside one valid slot),
  and is never writable in a read-only slot.

`TableAudit` walks a page's 512 entries, checks these and counts the leaves per level; a subclass
adds what one flavour checks beyond them (`mmio`, `table`, `leaf`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from ..arch.index import SPTE_ENT_PER_PAGE, pages_per_hpage
from ..errors import AuditError
from .mmu.page import role_smm
from .mmu.spte import SPTE_MMU_PRESENT_MASK, is_large_pte, is_mmio_spte, is_writable_pte, spte_to_pfn

if TYPE_CHECKING:
    from .memslots import Memslot
    from .mmu.page import ShadowPage
    from .vm import VM

# With MMIO caching on, shadow paging / NPT mark MMIO sptes with reserved physical-address bit 51.
_MMIO_RSVD_BIT = 1 << 51


def fail(msg: str) -> NoReturn:
    raise AuditError(msg)


def spte_name(sp: ShadowPage) -> str:
    """How a message names an spte of `sp`: the TDP MMU's are said to be so."""
    return "TDP MMU spte" if sp.tdp else "spte"


class TableAudit:
    """Checks the entries of the shadow pages it is given; ``leaves`` counts the present leaves per
    level (4 KiB, 2 MiB, 1 GiB), for the VM-wide pages_* statistics check."""

    def __init__(self, vm: VM, leaves: list[int]) -> None:
        self.vm = vm
        self.leaves = leaves

    def audit_table(self, sp: ShadowPage) -> None:
        kvm = self.vm.mmu
        m = kvm.masks
        mem = self.vm.host.mem
        for i in range(SPTE_ENT_PER_PAGE):
            sptep = sp.sptep(i)
            spte = mem.read(sptep, 8)
            if is_mmio_spte(m, spte):
                if sp.level != 1:
                    fail(f"MMIO spte {spte:#x} at level {sp.level} of {sp!r} (MMIO sptes are 4 KiB leaves)")
                self.mmio(sp, i, spte)
                continue
            if not spte & SPTE_MMU_PRESENT_MASK:
                if not m.mmio_enabled and spte & m.present and spte & _MMIO_RSVD_BIT:
                    fail(f"spte {spte:#x} in {sp!r}[{i}] looks like an MMIO spte while MMIO caching is off")
                continue
            if sp.level > 1 and not is_large_pte(spte):
                child = kvm.pages_by_pfn.get(spte_to_pfn(spte))
                if child is None or child.tdp != sp.tdp:
                    fail(f"non-leaf {spte_name(sp)} {spte:#x} in {sp!r}[{i}] points at no "
                         f"{'TDP MMU table' if sp.tdp else 'shadow page'}")
                if sptep not in child.parent_ptes:
                    fail(f"{child!r} lacks the parent pointer {sptep:#x} from {sp!r}[{i}]")
                self.table(sp, i, child)
                continue
            self.leaves[sp.level - 1] += 1
            gfn = sp.gfn_at(i)
            self.leaf(sp, i, sptep, spte, gfn, self.leaf_slot(sp, i, spte, gfn))

    def leaf_slot(self, sp: ShadowPage, i: int, spte: int, gfn: int) -> Memslot:
        """The memslot a present leaf maps, checked: this VM's page for gfn, no write to a read-only slot."""
        slot = self.vm.memslots.spaces[role_smm(sp.role)].search(gfn)
        span = pages_per_hpage(sp.level)
        where = f"{spte_name(sp)} {spte:#x} in {sp!r}[{i}]"
        if slot is None or slot.invalid or gfn + span > slot.end_gfn:
            fail(f"{where} maps gfn {gfn:#x} (+{span} pages), which no memslot backs")
        page = slot.gfn_to_hva(gfn) >> 12
        if spte_to_pfn(spte) != page:
            fail(f"{where} maps host frame {spte_to_pfn(spte):#x}, not gfn {gfn:#x}'s page {page:#x}")
        if is_writable_pte(spte) and slot.readonly:
            fail(f"{where} makes gfn {gfn:#x} of read-only slot {slot.id} writable")
        return slot

    # -- what a flavour checks beyond the shared rules -------------------------------------------
    def mmio(self, sp: ShadowPage, i: int, spte: int) -> None:
        """An MMIO spte at sp[i] (already known to be a 4 KiB leaf)."""

    def table(self, sp: ShadowPage, i: int, child: ShadowPage) -> None:
        """sp[i] links `child` (already known to be of this MMU and to record the link)."""

    def leaf(self, sp: ShadowPage, i: int, sptep: int, spte: int, gfn: int, slot: Memslot) -> None:
        """A present leaf at sp[i] mapping gfn from `slot` (already checked by leaf_slot)."""
