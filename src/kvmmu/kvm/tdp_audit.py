"""vm.audit() for the TDP MMU: its roots and every spte below them, checked from the tables.

- every TDP MMU page is reachable from exactly one root, through exactly one parent spte, and
  every page the tables reach is a TDP MMU page (no leak, no sharing, nothing freed in use);
- no leaf maps a host page the host swapped out (the MMU notifier zapped it);
- a valid root is referenced (by a vCPU or the zap worker); an invalidated one is still listed
  only while someone holds it;
- a child table is one level down and covers the gfn its parent entry does;
- a writable 4 KiB leaf of a dirty-logged slot has its page in the dirty bitmap;
- with generations, an MMIO spte of the current generation covers no memslot;
- the page count matches.  Returns the leaf counts per level for the VM-wide pages_* check.

What every spte obeys in either MMU (leaf frames, read-only slots, MMIO sptes as 4 KiB leaves, parent
pointers) is checked by the walk in audit_walk.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch.index import hpa_to_pfn, pfn_to_hpa
from .audit_walk import TableAudit, fail
from .memslots import KVM_MEM_LOG_DIRTY_PAGES
from .mmu.page import role_smm
from .mmu.spte import get_mmio_spte_generation, is_writable_pte, spte_to_pfn

if TYPE_CHECKING:
    from .memslots import Memslot
    from .mmu.page import ShadowPage
    from .vm import VM


def audit_tdp_mmu(vm: VM) -> list[int]:
    kvm = vm.mmu
    tdp = kvm.tdp_mmu
    leaves = [0, 0, 0]
    if tdp is None:
        if any(sp.tdp for sp in kvm.pages_by_pfn.values()):
            fail("TDP MMU pages exist but the TDP MMU is off")
        return leaves
    walk = _TdpAudit(vm, leaves)
    for root in tdp.roots:
        if root.root_count <= 0:
            fail(f"TDP MMU root {root!r} is listed with reference count {root.root_count}")
        if root.invalid != bool(root.role & (1 << 11)):
            fail(f"TDP MMU root {root!r}: invalid flag and role.invalid disagree")
        walk.audit_table(root)
    seen = walk.seen
    tdp_pages = {pfn for pfn, sp in kvm.pages_by_pfn.items() if sp.tdp}
    if tdp_pages != seen:
        fail(f"TDP MMU pages not reachable from any root: {sorted(hex(pfn_to_hpa(p)) for p in tdp_pages - seen)}")
    if tdp.pages != len(seen):
        fail(f"tdp_mmu_pages says {tdp.pages} but the roots reach {len(seen)} tables")
    for v in vm.vcpus:
        sp = v.mmu.root_sp
        if v.mmu.direct and sp is not None and sp.tdp and sp not in tdp.roots:
            fail(f"vcpu{v.id} runs on a TDP MMU root that is no longer listed")
    return leaves


class _TdpAudit(TableAudit):
    """From each root down: every table reached once (``seen``), each one where its parent says."""

    def __init__(self, vm: VM, leaves: list[int]) -> None:
        super().__init__(vm, leaves)
        self.seen: set[int] = set()

    def audit_table(self, sp: ShadowPage) -> None:
        if hpa_to_pfn(sp.hpa) in self.seen:
            fail(f"TDP MMU table {sp!r} is reached twice")
        self.seen.add(hpa_to_pfn(sp.hpa))
        super().audit_table(sp)

    def table(self, sp: ShadowPage, i: int, child: ShadowPage) -> None:
        gfn = sp.gfn_at(i)
        if child.level != sp.level - 1 or child.gfn != gfn:
            fail(f"{child!r} hangs below {sp!r}[{i}] but covers gfn {child.gfn:#x} at level {child.level}")
        self.audit_table(child)

    def mmio(self, sp: ShadowPage, i: int, spte: int) -> None:
        m = self.vm.mmu.masks
        as_id = role_smm(sp.role)
        gfn = sp.gfn_at(i)
        if m.gen is not None and get_mmio_spte_generation(m, spte) == self.vm.memslots.generation(as_id) & m.gen.mask \
                and self.vm.memslots.spaces[as_id].search(gfn) is not None:
            fail(f"MMIO spte {spte:#x} of the current generation covers gfn {gfn:#x}, which a memslot backs")

    def leaf(self, sp: ShadowPage, i: int, sptep: int, spte: int, gfn: int, slot: Memslot) -> None:
        if not self.vm.host.is_resident(spte_to_pfn(spte)):
            fail(f"TDP MMU spte {spte:#x} maps host page {spte_to_pfn(spte):#x}, which the host swapped out "
                 "(the MMU notifier must have zapped it)")
        if is_writable_pte(spte) and sp.level == 1 and slot.flags & KVM_MEM_LOG_DIRTY_PAGES \
                and gfn - slot.base_gfn not in slot.dirty_bitmap:
            fail(f"TDP MMU spte {spte:#x} lets the guest write gfn {gfn:#x} of dirty-logged slot {slot.id} unrecorded")
