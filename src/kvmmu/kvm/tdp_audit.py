"""vm.audit() for the TDP MMU: its roots and every spte below them, checked from the tables.

- every TDP MMU page is reachable from exactly one root, through exactly one parent spte, and
  every page the tables reach is a TDP MMU page (no leak, no sharing, nothing freed in use);
- no leaf maps a host page the host swapped out (the MMU notifier zapped it);
- a valid root is referenced (by a vCPU or the zap worker); an invalidated one is still listed
  only while someone holds it;
- a present leaf maps the memslot's own host page for its gfn (huge ones: aligned, inside one slot),
  never writable in a read-only slot, and a writable 4 KiB leaf of a dirty-logged slot has its page
  in the dirty bitmap;
- MMIO sptes are 4 KiB leaves; with generations, one of the current generation covers no memslot;
- the page count matches.  Returns the leaf counts per level for the VM-wide pages_* check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from ..arch.index import hpa_to_pfn, pfn_to_hpa
from ..errors import AuditError
from .memslots import KVM_MEM_LOG_DIRTY_PAGES
from .mmu.page import role_smm
from .mmu.spte import (
    SPTE_MMU_PRESENT_MASK,
    get_mmio_spte_generation,
    is_large_pte,
    is_mmio_spte,
    is_writable_pte,
    spte_to_pfn,
)
from .mmu.tdp_iter import pages_per_level

if TYPE_CHECKING:
    from .mmu.page import ShadowPage
    from .vm import VM


def _fail(msg: str) -> NoReturn:
    raise AuditError(msg)


def audit_tdp_mmu(vm: VM) -> list[int]:
    kvm = vm.mmu
    tdp = kvm.tdp_mmu
    leaves = [0, 0, 0]
    if tdp is None:
        if any(sp.tdp for sp in kvm.pages_by_pfn.values()):
            _fail("TDP MMU pages exist but the TDP MMU is off")
        return leaves
    seen: set[int] = set()
    for root in tdp.roots:
        if root.root_count <= 0:
            _fail(f"TDP MMU root {root!r} is listed with reference count {root.root_count}")
        if root.invalid != bool(root.role & (1 << 11)):
            _fail(f"TDP MMU root {root!r}: invalid flag and role.invalid disagree")
        _audit_table(vm, root, None, seen, leaves)
    tdp_pages = {pfn for pfn, sp in kvm.pages_by_pfn.items() if sp.tdp}
    if tdp_pages != seen:
        _fail(f"TDP MMU pages not reachable from any root: {sorted(hex(pfn_to_hpa(p)) for p in tdp_pages - seen)}")
    if tdp.pages != len(seen):
        _fail(f"tdp_mmu_pages says {tdp.pages} but the roots reach {len(seen)} tables")
    for v in vm.vcpus:
        sp = v.mmu.root_sp
        if v.mmu.direct and sp is not None and sp.tdp and sp not in tdp.roots:
            _fail(f"vcpu{v.id} runs on a TDP MMU root that is no longer listed")
    return leaves


def _audit_table(vm: VM, sp: ShadowPage, parent: int | None, seen: set[int], leaves: list[int]) -> None:
    kvm = vm.mmu
    m = kvm.masks
    mem = vm.host.mem
    if hpa_to_pfn(sp.hpa) in seen:
        _fail(f"TDP MMU table {sp!r} is reached twice")
    seen.add(hpa_to_pfn(sp.hpa))
    if parent is not None and parent not in sp.parent_ptes:
        _fail(f"TDP MMU table {sp!r} does not record its parent spte {parent:#x}")
    as_id = role_smm(sp.role)
    gen = vm.memslots.generation(as_id)
    for i in range(512):
        spte = mem.read(sp.sptep(i), 8)
        gfn = sp.gfn_at(i)
        if is_mmio_spte(m, spte):
            if sp.level != 1:
                _fail(f"MMIO spte {spte:#x} at level {sp.level} of {sp!r} (TDP MMU MMIO sptes are 4 KiB)")
            if m.gen is not None and get_mmio_spte_generation(m, spte) == gen & m.gen.mask \
                    and vm.memslots.spaces[as_id].search(gfn) is not None:
                _fail(f"MMIO spte {spte:#x} of the current generation covers gfn {gfn:#x}, which a memslot backs")
            continue
        if not spte & SPTE_MMU_PRESENT_MASK:
            continue
        if sp.level > 1 and not is_large_pte(spte):
            child = kvm.pages_by_pfn.get(spte_to_pfn(spte))
            if child is None or not child.tdp:
                _fail(f"non-leaf spte {spte:#x} in {sp!r}[{i}] points at no TDP MMU table")
            if child.level != sp.level - 1 or child.gfn != gfn:
                _fail(f"{child!r} hangs below {sp!r}[{i}] but covers gfn {child.gfn:#x} at level {child.level}")
            _audit_table(vm, child, sp.sptep(i), seen, leaves)
            continue
        leaves[sp.level - 1] += 1
        _audit_leaf(vm, sp, i, spte, gfn)


def _audit_leaf(vm: VM, sp: ShadowPage, i: int, spte: int, gfn: int) -> None:
    slot = vm.memslots.spaces[role_smm(sp.role)].search(gfn)
    span = pages_per_level(sp.level)
    if slot is None or slot.invalid or gfn + span > slot.end_gfn:
        _fail(f"TDP MMU spte {spte:#x} in {sp!r}[{i}] maps gfn {gfn:#x} (+{span} pages), which no memslot backs")
    if spte_to_pfn(spte) != slot.gfn_to_hva(gfn) >> 12:
        _fail(f"TDP MMU spte {spte:#x} in {sp!r}[{i}] maps host frame {spte_to_pfn(spte):#x}, not gfn {gfn:#x}'s "
              f"page {slot.gfn_to_hva(gfn) >> 12:#x}")
    if not vm.host.is_resident(spte_to_pfn(spte)):
        _fail(f"TDP MMU spte {spte:#x} maps host page {spte_to_pfn(spte):#x}, which the host swapped out "
              "(the MMU notifier must have zapped it)")
    if is_writable_pte(spte) and slot.readonly:
        _fail(f"TDP MMU spte {spte:#x} makes gfn {gfn:#x} of read-only slot {slot.id} writable")
    if is_writable_pte(spte) and sp.level == 1 and slot.flags & KVM_MEM_LOG_DIRTY_PAGES \
            and gfn - slot.base_gfn not in slot.dirty_bitmap:
        _fail(f"TDP MMU spte {spte:#x} lets the guest write gfn {gfn:#x} of dirty-logged slot {slot.id} unrecorded")
