"""KVM's TDP MMU (tdp_mmu.c): the MMU of every EPT/NPT host since `tdp_mmu=Y` became the default.

Its pages are `ShadowPage`s with `tdp` set, known by host frame (`KvmMmu.pages_by_pfn`) but in none
of the shadow MMU's structures: no gfn hash, no rmaps, no `active_mmu_pages`, no page quota, no
`mmu_cache_miss`.  Roots are found by role, reference-counted (`root_count` stands for
`tdp_mmu_root_count`) and, on `kvm_mmu_zap_all_fast`, invalidated and zapped afterwards rather than
zapped one page at a time: `mmu_shadow_zapped` never moves for them.  Every walk goes through the one
iterator of `tdp_iter.py`, and every change of an spte through `_set_spte`, whose
`handle_changed_spte` keeps `pages_4k/2m/1g`, frees removed tables and records dirty pages.

The TDP MMU holds a reference of its own to every valid root, so a root outlives the vCPUs that
drop it (kvm_mmu_unload on an MMU context reset) and is found again by role; it goes only when it is
invalidated, zapped and its last reference put.  That is mainline KVM, and what the Debian 6.1 kernel
of the real-KVM lab did (docs/tdp-mmu.md: a CR0.WP toggle, which resets the MMU context, rebuilt
no table).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ...arch.bits import ACC_ALL, PT_PAGE_SIZE_MASK, PT_WRITABLE_MASK
from ...arch.index import gpa_to_gfn, hpa_to_pfn
from ...errors import KvmBug
from .direct import fast_pf_fix_leaf, trace_fast_page_fault
from .hugepage import kvm_mmu_hugepage_adjust
from .install import build_spte, faultin_pfn, new_mmio_spte, trace_mark_mmio_spte
from .page import ROLE_INVALID, ROLE_LEVEL_MASK, ShadowPage, role_smm
from .pf import RET_PF_CONTINUE, RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS, KvmPageFault
from .spte import (
    SHADOW_NONPRESENT_VALUE,
    SPTE_MMU_PRESENT_MASK,
    is_mmio_spte,
    make_nonleaf_spte,
    spte_to_pfn,
)
from .tdp_iter import TdpIter, for_each_tdp_pte, pages_per_level

if TYPE_CHECKING:
    from ..memslots import Memslot
    from .context import VcpuMmu
    from .mmu import KvmMmu

# The value a table's entries take while the table is being freed (REMOVED_SPTE in KVM).
REMOVED_SPTE = 0x5A0
_NONPRESENT_PAGE = SHADOW_NONPRESENT_VALUE.to_bytes(8, "little") * 512
_PAGE_STATS = ("pages_4k", "pages_2m", "pages_1g")


def _is_leaf(spte: int, level: int) -> bool:
    return bool(spte & SPTE_MMU_PRESENT_MASK) and (level == 1 or bool(spte & PT_PAGE_SIZE_MASK))


class TdpMmu:
    """The TDP MMU's half of kvm->arch: the roots, the page count, the roots waiting to be zapped."""

    def __init__(self, kvm: KvmMmu) -> None:
        self.kvm = kvm
        self.vm = kvm.vm
        self.mem = kvm.mem
        self.roots: list[ShadowPage] = []          # tdp_mmu_roots, the newest first
        self.pages = 0                              # tdp_mmu_pages: TDP MMU tables in use
        self.zap_queue: list[ShadowPage] = []       # invalidated roots the zap worker still holds

    # -- pages --------------------------------------------------------------------------------------
    def _alloc_sp(self, gfn: int, role: int) -> ShadowPage:
        """tdp_mmu_alloc_sp + tdp_mmu_init_sp (+ tdp_account_mmu_page)."""
        kvm = self.kvm
        hpa = kvm.host.alloc_kernel_page()
        self.mem.write_bytes(hpa, _NONPRESENT_PAGE)
        sp = ShadowPage(gfn, role, hpa, kvm.mmu_valid_gen)
        sp.tdp = True
        kvm.pages_by_pfn[hpa_to_pfn(hpa)] = sp
        self.pages += 1
        self.vm.trace.emit("kvm_mmu_get_page", gfn=gfn, role=role, created=True)
        return sp

    def _free_sp(self, sp: ShadowPage) -> None:
        self.kvm.pages_by_pfn.pop(hpa_to_pfn(sp.hpa), None)
        self.kvm.host.free_kernel_page(sp.hpa)
        self.pages -= 1

    # -- roots ---------------------------------------------------------------------------------------
    def get_vcpu_root(self, mmu: VcpuMmu) -> ShadowPage:
        """kvm_tdp_mmu_get_vcpu_root_hpa: a valid root of this role gains a reference, else a new one
        with two (the vCPU's and the TDP MMU's own).  The role word includes the invalid bit, so an
        invalidated root never matches."""
        role = mmu.root_role
        for root in self.roots:
            if root.role == role and root.root_count:
                root.root_count += 1
                return root
        root = self._alloc_sp(0, role)
        root.root_count = 2
        self.roots.insert(0, root)
        return root

    def put_root(self, root: ShadowPage) -> None:
        """kvm_tdp_mmu_put_root: the last reference (never that of a valid root) frees it."""
        root.root_count -= 1
        if root.root_count:
            return
        if not root.invalid:
            raise KvmBug(f"the last reference to the valid TDP MMU root {root!r} was put")
        self.roots.remove(root)
        self._free_sp(root)

    def _mark_invalid(self, root: ShadowPage) -> None:
        root.invalid = True
        root.role |= ROLE_INVALID

    def invalidate_all_roots(self) -> None:
        """kvm_tdp_mmu_invalidate_all_roots: each valid root is marked invalid and scheduled to be zapped
        (tdp_mmu_scheduled_root_to_zap); vCPUs drop their references on KVM_REQ_MMU_FREE_OBSOLETE_ROOTS."""
        for root in self.roots:
            if not root.invalid:
                self._mark_invalid(root)
                self.zap_queue.append(root)

    def zap_invalidated_roots(self) -> None:
        """kvm_tdp_mmu_zap_invalidated_roots: every invalidated root loses all its sptes before the
        memslot update returns; then the TDP MMU's own reference is put (freed with the last one)."""
        queue, self.zap_queue = self.zap_queue, []
        for root in queue:
            self._zap_root(root)
            self.put_root(root)

    def zap_all(self) -> None:
        """kvm_tdp_mmu_zap_all: every root, valid or not, loses all its sptes now (kvm_mmu_zap_all)."""
        for root in list(self.roots):
            self._zap_root(root)

    def _zap_root(self, root: ShadowPage) -> None:
        """tdp_mmu_zap_root: the 1 GiB level first, then the root's own entries."""
        end = pages_per_level(root.level + 1)
        for zap_level in (3, root.level):
            for it in for_each_tdp_pte(self.mem, root.hpa, root.level, 0, end, min_level=zap_level,
                                       as_id=role_smm(root.role)):
                if it.level > zap_level or not it.old_spte & SPTE_MMU_PRESENT_MASK:
                    continue
                self._set_spte(it, SHADOW_NONPRESENT_VALUE)

    # -- changing an spte (tdp_mmu_set_spte, handle_changed_spte) ------------------------------------
    def _set_spte(self, it: TdpIter, new: int, record_dirty: bool = True) -> None:
        old = it.old_spte
        self.mem.write(it.sptep, 8, new)
        it.old_spte = new
        self._handle_changed(it.as_id, it.gfn, old, new, it.level, record_dirty)

    def _handle_changed(self, as_id: int, gfn: int, old: int, new: int, level: int, record_dirty: bool) -> None:
        if old == new:
            return
        self.vm.trace.emit("kvm_tdp_mmu_spte_changed", as_id=as_id, gfn=gfn, level=level, old_spte=old, new_spte=new)
        was_present = bool(old & SPTE_MMU_PRESENT_MASK)
        is_present = bool(new & SPTE_MMU_PRESENT_MASK)
        if not was_present and not is_present:
            return                         # MMIO or non-present: no page behind it
        was_leaf = _is_leaf(old, level)
        is_leaf = _is_leaf(new, level)
        if was_leaf != is_leaf:
            self.kvm.stats[_PAGE_STATS[level - 1]] += 1 if is_leaf else -1
        if was_present and not was_leaf and (is_leaf or not is_present):
            self._handle_removed_pt(self.kvm.pages_by_pfn[spte_to_pfn(old)])
        # handle_changed_spte_dirty_log: a 4 KiB spte that becomes writable dirties its page.
        if record_dirty and level == 1 and is_leaf and new & PT_WRITABLE_MASK and \
                (not old & PT_WRITABLE_MASK or spte_to_pfn(old) != spte_to_pfn(new)):
            slot = self.vm.memslots.spaces[as_id].search(gfn)
            if slot is not None:
                self.vm.mark_page_dirty(slot, gfn)

    def _handle_removed_pt(self, sp: ShadowPage) -> None:
        """handle_removed_pt: a table left the paging structure; its present entries are removed
        (recursively) and the table is freed.  Traced like a zap, counted as none."""
        self.vm.trace.emit("kvm_mmu_prepare_zap_page", gfn=sp.gfn, role=sp.role)
        mem = self.mem
        as_id = role_smm(sp.role)
        for i in range(512):
            sptep = sp.sptep(i)
            old = mem.read(sptep, 8)
            if not old & SPTE_MMU_PRESENT_MASK:
                continue
            mem.write(sptep, 8, REMOVED_SPTE)
            self._handle_changed(as_id, sp.gfn_at(i), old, REMOVED_SPTE, sp.level, True)
        self._free_sp(sp)

    # -- the fault path ------------------------------------------------------------------------------
    def page_fault(self, mmu: VcpuMmu, fault: KvmPageFault) -> int:
        """direct_page_fault for a TDP MMU root: no page quota, then kvm_tdp_mmu_map."""
        kvm = self.kvm
        fault.gfn = gpa_to_gfn(fault.addr)
        fault.slot = mmu.vcpu.gfn_to_memslot(fault.gfn)
        if not fault.rsvd and fault.present and fault.write and kvm.is_write_tracked(fault.gfn):
            return RET_PF_EMULATE
        r = self.fast_page_fault(mmu, fault)
        if r is not None:
            return r
        r = faultin_pfn(mmu, fault, ACC_ALL)
        if r != RET_PF_CONTINUE:
            return r
        if not mmu.root_valid:
            return RET_PF_RETRY
        return self.map(mmu, fault)

    def fast_page_fault(self, mmu: VcpuMmu, fault: KvmPageFault) -> int | None:
        """fast_page_fault on the last spte kvm_tdp_mmu_fast_pf_get_last_sptep finds.  A huge spte of a
        dirty-logged slot is not made writable here (its 4 KiB pages would all need marking)."""
        if fault.rsvd or not fault.present or not fault.write:
            return None
        last = None
        root: ShadowPage = mmu.root_sp  # type: ignore[assignment]  # faults are taken on a loaded root
        for it in for_each_tdp_pte(self.mem, root.hpa, root.level, fault.gfn, fault.gfn + 1):
            last = (it.sptep, it.old_spte, it.level)
        if last is None:
            return None
        sptep, spte, level = last
        if not _is_leaf(spte, level):
            trace_fast_page_fault(mmu, fault, sptep, spte, None)
            return None
        return fast_pf_fix_leaf(mmu, fault, sptep, spte, level)

    def map(self, mmu: VcpuMmu, fault: KvmPageFault) -> int:
        """kvm_tdp_mmu_map: tables linked on the way down, then the leaf (or MMIO spte) at the goal
        level.  No prefetch: exactly the faulting page is mapped."""
        kvm_mmu_hugepage_adjust(mmu, fault)
        goal = fault.goal_level
        self.vm.trace.emit("kvm_mmu_spte_requested", gfn=fault.gfn, pfn=fault.pfn, level=goal)
        root: ShadowPage = mmu.root_sp  # type: ignore[assignment]  # faults are taken on a loaded root
        masks = self.kvm.masks
        reached = None
        for it in for_each_tdp_pte(self.mem, root.hpa, root.level, fault.gfn, fault.gfn + 1, as_id=role_smm(root.role)):
            if it.level == goal:
                reached = it
                break
            if it.old_spte & SPTE_MMU_PRESENT_MASK and it.old_spte & PT_PAGE_SIZE_MASK:
                # A huge page where a table must go: zap it first (tdp_mmu_zap_spte_atomic).
                self._set_spte(it, SHADOW_NONPRESENT_VALUE)
                self.kvm.flush_remote_tlbs()
            if not it.old_spte & SPTE_MMU_PRESENT_MASK:
                parent = self.kvm.sptep_to_sp(it.sptep)
                child = self._alloc_sp(it.gfn, (parent.role & ~ROLE_LEVEL_MASK) | (it.level - 1))
                child.parent_ptes.add(it.sptep)
                self._set_spte(it, make_nonleaf_spte(masks, child.hpa))       # tdp_mmu_link_sp
        if reached is None:
            return RET_PF_RETRY
        return self._map_target_level(mmu, fault, reached)

    def _map_target_level(self, mmu: VcpuMmu, fault: KvmPageFault, it: TdpIter) -> int:
        """tdp_mmu_map_handle_target_level."""
        sp = self.kvm.sptep_to_sp(it.sptep)
        wrprot = False
        if fault.slot is None:
            new = new_mmio_spte(mmu, it.gfn, ACC_ALL)
        else:
            new, wrprot = build_spte(mmu, sp, fault.slot, ACC_ALL, it.gfn, fault.pfn, it.old_spte, False, False,
                                     fault.map_writable)
        old = it.old_spte
        ret = RET_PF_FIXED
        if new == old:
            ret = RET_PF_SPURIOUS
        else:
            self._set_spte(it, new)
            mmu.vcpu.counters["spte_installs"] += 1
            if old & SPTE_MMU_PRESENT_MASK and not _is_leaf(old, it.level):
                self.kvm.flush_remote_tlbs()
        if wrprot and fault.write:
            ret = RET_PF_EMULATE
        if is_mmio_spte(self.kvm.masks, new):
            mmu.vcpu.stats["pf_mmio_spte_created"] += 1
            trace_mark_mmio_spte(mmu, it.sptep, it.gfn, new)
            return RET_PF_EMULATE
        self.vm.trace.emit("kvm_mmu_set_spte", level=it.level, gfn=it.gfn, spte=new, sptep=it.sptep)
        return ret

    # -- the lockless walk of the MMIO fast path --------------------------------------------------------
    def get_walk(self, mmu: VcpuMmu, addr: int) -> list[tuple[int, int]]:
        """kvm_tdp_mmu_get_walk: (level, spte) from the root down to the last spte for addr."""
        root: ShadowPage = mmu.root_sp  # type: ignore[assignment]  # the caller found a TDP root
        gfn = gpa_to_gfn(addr)
        return [(it.level, it.old_spte) for it in for_each_tdp_pte(self.mem, root.hpa, root.level, gfn, gfn + 1)]

    # -- gfn ranges: MMU notifier, aging, write protection, dirty logging -------------------------------
    def _roots(self, as_id: int, only_valid: bool) -> list[ShadowPage]:
        return [r for r in self.roots if role_smm(r.role) == as_id and not (only_valid and r.invalid)]

    def _leaves(self, root: ShadowPage, start: int, end: int, min_level: int = 1) -> Iterator[TdpIter]:
        for it in for_each_tdp_pte(self.mem, root.hpa, root.level, start, end, min_level, as_id=role_smm(root.role)):
            if _is_leaf(it.old_spte, it.level):
                yield it

    def unmap_gfn_range(self, as_id: int, start: int, end: int) -> bool:
        """kvm_tdp_mmu_unmap_gfn_range (tdp_mmu_zap_leafs on every root, invalid ones too): True if a
        TLB flush is due.  Tables and MMIO sptes stay."""
        flush = False
        for root in self._roots(as_id, False):
            for it in self._leaves(root, start, end):
                self._set_spte(it, SHADOW_NONPRESENT_VALUE)
                flush = True
        return flush

    def age_gfn_range(self, as_id: int, start: int, end: int) -> bool:
        """kvm_tdp_mmu_age_gfn_range: clear the accessed bit of every leaf in the range; True if one
        was set.  Without A/D bits (EPT with ept_ad=False) nothing is young: access tracking, which
        KVM would use there, is not modelled."""
        abit = self.kvm.masks.accessed
        if not abit:
            return False
        young = False
        for root in self._roots(as_id, False):
            for it in self._leaves(root, start, end):
                if it.old_spte & abit:
                    self._set_spte(it, it.old_spte & ~abit)
                    young = True
        return young

    def write_protect_gfn(self, as_id: int, gfn: int, clear: int) -> bool:
        """kvm_tdp_mmu_write_protect_gfn (valid roots, every level): clear `clear` (W, and for a shadowed
        page table MMU-writable too); True if a writable spte changed."""
        changed = False
        for root in self._roots(as_id, True):
            for it in self._leaves(root, gfn, gfn + 1):
                if it.old_spte & clear:
                    changed |= bool(it.old_spte & PT_WRITABLE_MASK)
                    self._set_spte(it, it.old_spte & ~clear, record_dirty=False)
        return changed

    def wrprot_slot(self, slot: Memslot, min_level: int = 1) -> bool:
        """kvm_tdp_mmu_wrprot_slot, when dirty logging starts: W is cleared on every writable leaf of
        the slot (MMU-writable stays, so fast_page_fault can restore it); True if a flush is due."""
        flush = False
        for root in self._roots(slot.as_id, True):
            for it in self._leaves(root, slot.base_gfn, slot.end_gfn, min_level):
                if it.old_spte & PT_WRITABLE_MASK:
                    self._set_spte(it, it.old_spte & ~PT_WRITABLE_MASK, record_dirty=False)
                    flush = True
        return flush

    def clear_dirty_pt_masked(self, slot: Memslot, gfns: list[int]) -> bool:
        """kvm_tdp_mmu_clear_dirty_pt_masked with wrprot (no PML): after KVM_GET_DIRTY_LOG, the 4 KiB
        sptes of the pages reported dirty lose W again; True if one did."""
        changed = False
        for root in self._roots(slot.as_id, False):
            for gfn in gfns:
                for it in self._leaves(root, gfn, gfn + 1):
                    if it.level == 1 and it.old_spte & PT_WRITABLE_MASK:
                        self._set_spte(it, it.old_spte & ~PT_WRITABLE_MASK, record_dirty=False)
                        changed = True
        return changed
