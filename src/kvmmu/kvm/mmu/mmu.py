"""The VM-wide half of KVM's MMU (mmu.c): shadow pages, the gfn hash, rmaps, write protection,
unsync, zapping, the page quota.  Per-vCPU state and the fault paths live in vcpu_mmu/paging/tdp.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ...arch.bits import PT_PAGE_SIZE_MASK, PT_WRITABLE_MASK
from ...arch.index import hpa_to_pfn
from ...errors import KvmBug
from .hugepage import KVM_MAX_HUGEPAGE_LEVEL, lpage_index, pages_per_hpage
from .page import ROLE_INVALID, ROLE_PASSTHROUGH, ShadowPage, role_smm, trace_fields
from .page_track import kvm_mmu_track_write
from .spte import (
    SHADOW_NONPRESENT_VALUE,
    SPTE_MMU_PRESENT_MASK,
    SpteMasks,
    is_mmio_spte,
    spte_to_pfn,
)

if TYPE_CHECKING:
    from ..vm import VM
    from .tdp_mmu import TdpMmu

_NONPRESENT_PAGE = SHADOW_NONPRESENT_VALUE.to_bytes(8, "little") * 512
_UNPACK_SPTES = struct.Struct("<512Q").unpack
_UNPACK_Q = struct.Struct("<Q").unpack_from
KVM_MIN_FREE_MMU_PAGES = 5
KVM_REFILL_PAGES = 25


class KvmMmu:
    """Everything KVM's MMU keeps per VM (kvm->arch)."""

    def __init__(self, vm: VM, masks: SpteMasks, max_mmu_pages: int | None = None) -> None:
        self.vm = vm
        self.host = vm.host
        self.mem = vm.host.mem
        self.masks = masks
        self.stats = vm.stats
        self.page_hash: dict[int, list[ShadowPage]] = {}
        self.active_mmu_pages: dict[ShadowPage, None] = {}      # insertion order: oldest first
        self.pages_by_pfn: dict[int, ShadowPage] = {}
        self.rmap: dict[tuple[int, int], set[int]] = {}        # (as_id, gfn) -> leaf sptes
        self.write_track: dict[int, int] = {}                    # gfn -> upper-level shadow pages
        # (as_id, level, gfn >> 9*(level-1)) -> shadowed guest tables in that huge frame
        # (kvm_mmu_gfn_disallow_lpage's count in lpage_info; see hugepage.py)
        self.disallow_lpage: dict[tuple[int, int, int], int] = {}
        self.indirect_shadow_pages = 0
        self.mmu_valid_gen = 0
        self.n_used_mmu_pages = 0
        self.n_max_mmu_pages = max_mmu_pages if max_mmu_pages is not None else 1 << 30
        self.tdp_mmu: TdpMmu | None = None                      # set by the VM when tdp_mmu is on

    # -- spte access (KVM's tables are in host memory; the CPU walks them) ---------------------------
    def read_spte(self, sptep: int) -> int:
        # SparseMemory.read's in-page case, inlined (sptes are 8-byte aligned; a page exists only
        # inside the memory); an absent page reads as 0 there too.
        page = self.mem.pages.get(sptep >> 12)
        if page is not None and not sptep & 7:
            return _UNPACK_Q(page, sptep & 0xFFF)[0]
        return self.mem.read(sptep, 8)

    def write_spte(self, sptep: int, value: int) -> None:
        self.mem.write(sptep, 8, value)

    def live_spte_indices(self, sp: ShadowPage) -> range | list[int]:
        """The indices of sp's sptes that are shadow-present or MMIO, from one read of the page: the
        per-entry loops (zap, sync) do nothing for the others, and never make one present."""
        page = self.mem.pages.get(sp.hpa >> 12)
        if page is None:
            return range(512)
        m = self.masks
        mask, value = (m.mmio_mask, m.mmio_value) if m.mmio_enabled else (0, -1)
        # Most entries are SHADOW_NONPRESENT_VALUE: one comparison rules them out (when it is neither).
        np = SHADOW_NONPRESENT_VALUE if SHADOW_NONPRESENT_VALUE & mask != value else None
        return [i for i, s in enumerate(_UNPACK_SPTES(page))
                if s != np and (s & SPTE_MMU_PRESENT_MASK or s & mask == value)]

    def sptep_to_sp(self, sptep: int) -> ShadowPage:
        return self.pages_by_pfn[sptep >> 12]

    def spte_to_child_sp(self, spte: int) -> ShadowPage:
        sp = self.pages_by_pfn.get(spte_to_pfn(spte))
        if sp is None:
            raise KvmBug(f"non-leaf spte {spte:#x} points at no shadow page")
        return sp

    # -- shadow page lifetime -------------------------------------------------------------------
    def is_obsolete(self, sp: ShadowPage) -> bool:
        """is_obsolete_sp: TDP MMU pages do not use the MMU generation, only the invalid bit."""
        return sp.invalid or (not sp.tdp and sp.mmu_valid_gen != self.mmu_valid_gen)

    def pages_for_gfn(self, gfn: int) -> list[ShadowPage]:
        return [sp for sp in self.page_hash.get(gfn, ()) if not self.is_obsolete(sp)]

    def indirect_pages_for_gfn(self, gfn: int) -> Iterator[ShadowPage]:
        """for_each_gfn_valid_sp_with_gptes."""
        for sp in self.page_hash.get(gfn, ()):
            if not self.is_obsolete(sp) and not sp.direct and not sp.role & ROLE_PASSTHROUGH:
                yield sp

    def alloc_page(self, gfn: int, role: int) -> ShadowPage:
        hpa = self.host.alloc_kernel_page()
        self.mem.write_bytes(hpa, _NONPRESENT_PAGE)
        sp = ShadowPage(gfn, role, hpa, self.mmu_valid_gen)
        self.pages_by_pfn[hpa_to_pfn(hpa)] = sp
        self.page_hash.setdefault(gfn, []).append(sp)
        self.active_mmu_pages[sp] = None
        self.n_used_mmu_pages += 1
        if not sp.direct and not role & ROLE_PASSTHROUGH:
            self.account_shadowed(sp)
        if self.vm.trace.enabled:
            self.vm.trace.emit("kvm_mmu_get_page", created=True, **trace_fields(sp))
        return sp

    def account_shadowed(self, sp: ShadowPage) -> None:
        """A guest page table is shadowed: keep it write-protected (upper levels are write-tracked)."""
        sp.accounted = True
        self.indirect_shadow_pages += 1
        if sp.level > 1:
            self.write_track[sp.gfn] = self.write_track.get(sp.gfn, 0) + 1
        self._update_disallow_lpage(role_smm(sp.role), sp.gfn, 1)
        # Every level: a huge spte over the table's gfn must stop being writable too.
        if self.write_protect_gfn(sp.gfn, role_smm(sp.role)):
            self.flush_remote_tlbs()

    def unaccount_shadowed(self, sp: ShadowPage) -> None:
        sp.accounted = False
        self.indirect_shadow_pages -= 1
        self._update_disallow_lpage(role_smm(sp.role), sp.gfn, -1)
        if sp.level > 1:
            n = self.write_track[sp.gfn] - 1
            if n:
                self.write_track[sp.gfn] = n
            else:
                del self.write_track[sp.gfn]

    def _update_disallow_lpage(self, as_id: int, gfn: int, count: int) -> None:
        """update_gfn_disallow_lpage_count for every huge level."""
        for level in range(2, KVM_MAX_HUGEPAGE_LEVEL + 1):
            key = (as_id, level, lpage_index(gfn, level))
            n = self.disallow_lpage.get(key, 0) + count
            if n < 0:
                raise KvmBug(f"disallow_lpage count of gfn {gfn:#x} at level {level} went negative")
            if n:
                self.disallow_lpage[key] = n
            else:
                del self.disallow_lpage[key]

    def is_write_tracked(self, gfn: int) -> bool:
        if gfn in self.write_track:
            return True
        return any(g in self.write_track for _, g in self.host_page_aliases(gfn))

    # -- memslots that share a host page (two slots on one userspace_addr) --------------------------
    def host_page_aliases(self, gfn: int, as_id: int = 0) -> list[tuple[int, int]]:
        """The other (as_id, gfn)s whose memslot maps gfn's host page.

        KVM tracks writes to shadowed guest tables by gfn (kvm_slot_page_track_add_page,
        kvm_gfn_is_write_tracked), so a guest storing to its page table through an alias gfn is not
        noticed and keeps the old translation past INVLPG and MOV CR3.  The model tracks by host page
        (the SDM's promise: the store changes the table) unless asked for KVM's behaviour."""
        if self.vm.kvm_deviations or not self.vm.memslots_alias():
            return []
        slot = self.vm.memslots.spaces[as_id].search(gfn)
        if slot is None:
            return []
        hva = slot.gfn_to_hva(gfn)
        out = []
        for other in self.vm.memslots.all_slots():
            start = other.userspace_addr
            if start <= hva < start + (other.npages << 12) and not (other.id == slot.id and other.as_id == as_id):
                out.append((other.as_id, other.base_gfn + ((hva - start) >> 12)))
        return out

    # -- rmaps and page statistics -------------------------------------------------------------
    def rmap_add(self, as_id: int, gfn: int, sptep: int, level: int) -> None:
        self.rmap.setdefault((as_id, gfn), set()).add(sptep)
        self.stats[("pages_4k", "pages_2m", "pages_1g")[level - 1]] += 1

    def rmap_remove(self, as_id: int, gfn: int, sptep: int, level: int) -> None:
        sptes = self.rmap.get((as_id, gfn))
        if sptes is None or sptep not in sptes:
            raise KvmBug(f"rmap of gfn {gfn:#x} lacks spte at {sptep:#x}")
        sptes.discard(sptep)
        if not sptes:
            del self.rmap[(as_id, gfn)]
        self.stats[("pages_4k", "pages_2m", "pages_1g")[level - 1]] -= 1

    def gfn_leaf_sptes(self, as_id: int, gfn: int) -> list[int]:
        """Leaf sptes that map gfn at any level (gfn_to_rmap at each level): 4 KiB ones on gfn's rmap,
        huge ones on the rmap of their frame's first gfn."""
        out = list(self.rmap.get((as_id, gfn), ()))
        for level in range(2, KVM_MAX_HUGEPAGE_LEVEL + 1):
            base = gfn & ~(pages_per_hpage(level) - 1)
            if base != gfn:
                out.extend(p for p in self.rmap.get((as_id, base), ()) if self.sptep_to_sp(p).level == level)
        return out

    def leaf_gfn(self, sp: ShadowPage, index: int) -> int:
        return sp.gfn_at(index)

    def drop_spte(self, sptep: int) -> None:
        """Clear a present leaf spte and its rmap entry."""
        sp = self.sptep_to_sp(sptep)
        index = (sptep & 0xFFF) >> 3
        self.rmap_remove(role_smm(sp.role), sp.gfn_at(index), sptep, sp.level)
        self.write_spte(sptep, SHADOW_NONPRESENT_VALUE)

    def write_protect_gfn(self, gfn: int, as_id: int = 0, for_dirty_log: bool = False) -> bool:
        """Clear W in every spte mapping gfn, huge ones included (kvm_mmu_slot_gfn_write_protect from
        PG_LEVEL_4K up); True if something changed (a TLB flush is due).

        Dirty logging keeps MMU-writable set (1/1/0: fast_page_fault may restore W on a 4 KiB spte);
        protecting a shadowed guest page table clears it too (1/0/0: only the full path, via unsync, may).
        """
        changed = False
        clear = 2 if for_dirty_log else 2 | self.masks.mmu_writable
        sptes = self.gfn_leaf_sptes(as_id, gfn)
        if not for_dirty_log:
            for a, g in self.host_page_aliases(gfn, as_id):
                sptes.extend(self.gfn_leaf_sptes(a, g))     # the table is writable through no alias either
        for sptep in sptes:
            spte = self.read_spte(sptep)
            if spte & clear:
                self.write_spte(sptep, spte & ~clear)
                changed |= bool(spte & PT_WRITABLE_MASK)
        if self.tdp_mmu is not None:
            changed |= self.tdp_mmu.write_protect_gfn(as_id, gfn, clear)
        return changed

    # -- linking ----------------------------------------------------------------------------------
    def link_shadow_page(self, sptep: int, child: ShadowPage) -> None:
        m = self.masks
        spte = child.hpa | SPTE_MMU_PRESENT_MASK | m.present | 2 | m.user | m.x | m.accessed
        self.write_spte(sptep, spte)
        child.parent_ptes.add(sptep)
        if child.unsync or child.unsync_children:
            self.mark_unsync(sptep)

    def drop_parent_pte(self, child: ShadowPage, sptep: int) -> None:
        child.parent_ptes.discard(sptep)
        self.write_spte(sptep, SHADOW_NONPRESENT_VALUE)

    # -- unsync ----------------------------------------------------------------------------------
    def mark_unsync(self, sptep: int) -> None:
        """Record in the parent of sptep (and upwards) that a child below has unsync pages."""
        sp = self.sptep_to_sp(sptep)
        index = (sptep & 0xFFF) >> 3
        if index in sp.unsync_children:
            return
        sp.unsync_children.add(index)
        if len(sp.unsync_children) == 1:
            for parent in list(sp.parent_ptes):
                self.mark_unsync(parent)

    def clear_unsync_child_bit(self, sp: ShadowPage, index: int) -> None:
        sp.unsync_children.discard(index)

    def unsync_page(self, sp: ShadowPage) -> None:
        sp.unsync = True
        self.stats["mmu_unsync"] += 1
        if self.vm.trace.enabled:
            self.vm.trace.emit("kvm_mmu_unsync_page", **trace_fields(sp))
        for parent in list(sp.parent_ptes):
            self.mark_unsync(parent)

    def unlink_unsync_page(self, sp: ShadowPage) -> None:
        if not sp.unsync:
            raise KvmBug(f"unlinking {sp!r}, which is not unsync (kvm_unlink_unsync_page's WARN_ON)")
        sp.unsync = False
        self.stats["mmu_unsync"] -= 1

    def try_to_unsync_pages(self, gfn: int, synchronizing: bool, prefetch: bool) -> bool:
        """mmu_try_to_unsync_pages: True if the gfn may be mapped writable."""
        if self.is_write_tracked(gfn):
            return False
        gfns = [gfn] + [g for _, g in self.host_page_aliases(gfn)]
        for sp in [sp for g in gfns for sp in self.indirect_pages_for_gfn(g)]:
            if synchronizing:
                return False
            if sp.unsync:
                continue
            if prefetch:
                return False
            if sp.level != 1:
                raise KvmBug(f"unsyncing an upper-level shadow page {sp!r}")
            self.unsync_page(sp)
        return True

    # -- zapping -----------------------------------------------------------------------------------
    def mmu_page_zap_pte(self, sp: ShadowPage, sptep: int, invalid_list: list[ShadowPage] | None) -> bool:
        """Clear one spte of sp; True if it was shadow-present (a flush is due)."""
        spte = self.read_spte(sptep)
        if spte & SPTE_MMU_PRESENT_MASK:
            if sp.level == 1 or spte & PT_PAGE_SIZE_MASK:
                self.drop_spte(sptep)
            else:
                child = self.spte_to_child_sp(spte)
                self.drop_parent_pte(child, sptep)
                sp.unsync_children.discard((sptep & 0xFFF) >> 3)
                # mmu_page_zap_pte's own tdp_enabled test: an orphaned guest_mode (shadow EPT) child
                # is zapped at once.
                if (invalid_list is not None and child.role & (1 << 17) and not child.parent_ptes
                        and self.vm.tdp_enabled):
                    self.prepare_zap_page(child, invalid_list)
            return True
        if is_mmio_spte(self.masks, spte):
            self.write_spte(sptep, SHADOW_NONPRESENT_VALUE)
        return False

    def prepare_zap_page(self, sp: ShadowPage, invalid_list: list[ShadowPage]) -> bool:
        """__kvm_mmu_prepare_zap_page: unlink sp everywhere; returns True if it went to invalid_list."""
        if sp.invalid and sp not in self.active_mmu_pages:
            return False
        self.stats["mmu_shadow_zapped"] += 1
        if self.vm.trace.enabled:
            self.vm.trace.emit("kvm_mmu_prepare_zap_page", **trace_fields(sp))
        if sp.unsync_children:
            self._zap_unsync_children(sp, invalid_list)
        hpa = sp.hpa
        for i in self.live_spte_indices(sp):
            self.mmu_page_zap_pte(sp, hpa + 8 * i, invalid_list)
        for parent in list(sp.parent_ptes):
            psp = self.sptep_to_sp(parent)
            psp.unsync_children.discard((parent & 0xFFF) >> 3)
            self.drop_parent_pte(sp, parent)
        if not sp.invalid and sp.accounted:
            self.unaccount_shadowed(sp)
        if sp.unsync:
            self.unlink_unsync_page(sp)
        was_invalid = sp.invalid
        sp.invalid = True
        sp.role |= ROLE_INVALID
        if sp.root_count == 0:
            self._unhash(sp)
            del self.active_mmu_pages[sp]
            self.n_used_mmu_pages -= 1
            invalid_list.append(sp)
            return True
        if not was_invalid:
            # Still a root of some vCPU: it stays pinned (and invalid) until the vCPU drops it.
            self.vm.request_all("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS")
        return False

    def _zap_unsync_children(self, sp: ShadowPage, invalid_list: list[ShadowPage]) -> None:
        for child in self._unsync_descendants(sp):
            self.prepare_zap_page(child, invalid_list)

    def _unsync_descendants(self, sp: ShadowPage) -> list[ShadowPage]:
        out: list[ShadowPage] = []
        for index in sorted(sp.unsync_children):
            spte = self.read_spte(sp.sptep(index))
            if not spte & SPTE_MMU_PRESENT_MASK:
                continue
            child = self.pages_by_pfn.get(spte_to_pfn(spte))
            if child is None:
                continue
            if child.unsync:
                out.append(child)
            if child.unsync_children:
                out.extend(self._unsync_descendants(child))
        return out

    def _unhash(self, sp: ShadowPage) -> None:
        bucket = self.page_hash.get(sp.gfn)
        if bucket is not None and sp in bucket:
            bucket.remove(sp)
            if not bucket:
                del self.page_hash[sp.gfn]

    def commit_zap_page(self, invalid_list: list[ShadowPage]) -> None:
        """kvm_mmu_commit_zap_page: flush every vCPU's TLB, then free the pages."""
        if not invalid_list:
            return
        self.flush_remote_tlbs()
        for sp in invalid_list:
            self.pages_by_pfn.pop(hpa_to_pfn(sp.hpa), None)
            self.host.free_kernel_page(sp.hpa)
        invalid_list.clear()

    def zap_page(self, sp: ShadowPage) -> None:
        invalid: list[ShadowPage] = []
        self.prepare_zap_page(sp, invalid)
        self.commit_zap_page(invalid)

    def zap_all(self) -> None:
        """kvm_mmu_zap_all: every shadow page, now."""
        invalid: list[ShadowPage] = []
        for sp in list(self.active_mmu_pages):
            if sp in self.active_mmu_pages:
                self.prepare_zap_page(sp, invalid)
        self.commit_zap_page(invalid)
        if self.tdp_mmu is not None:
            self.tdp_mmu.zap_all()
            self.flush_remote_tlbs()

    def zap_all_fast(self) -> None:
        """kvm_mmu_zap_all_fast: make every page obsolete, have vCPUs drop their roots, zap the rest.
        The tracepoint records the generation before it flips; TDP MMU roots are invalidated (in
        the same step as the request) and zapped at the end, outside the shadow MMU's accounting."""
        self.vm.trace.emit("kvm_mmu_zap_all_fast", mmu_valid_gen=self.mmu_valid_gen,
                           mmu_used_pages=self.n_used_mmu_pages)
        self.mmu_valid_gen ^= 1
        if self.tdp_mmu is not None:
            self.tdp_mmu.invalidate_all_roots()
        self.vm.request_all("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS")
        invalid: list[ShadowPage] = []
        for sp in list(self.active_mmu_pages):
            if sp in self.active_mmu_pages and sp.mmu_valid_gen != self.mmu_valid_gen:
                self.prepare_zap_page(sp, invalid)
        self.commit_zap_page(invalid)
        if self.tdp_mmu is not None:
            self.tdp_mmu.zap_invalidated_roots()

    def unprotect_page(self, gfn: int) -> bool:
        """kvm_mmu_unprotect_page: zap every valid shadow page that shadows a guest table at gfn (so
        writes to it stop being tracked); True if there was one.  TDP MMU pages are never among them."""
        invalid: list[ShadowPage] = []
        found = False
        for sp in list(self.indirect_pages_for_gfn(gfn)):
            found = True
            self.prepare_zap_page(sp, invalid)
        self.commit_zap_page(invalid)
        return found

    def zap_gfn_range(self, as_id: int, start: int, end: int) -> None:
        """Zap leaf mappings of gfns in [start, end) and the shadow pages of those gfns."""
        invalid: list[ShadowPage] = []
        flush = False
        for (a, gfn), sptes in list(self.rmap.items()):
            if a == as_id and start <= gfn < end:
                for sptep in list(sptes):
                    self.drop_spte(sptep)
                    flush = True
        for gfn in [g for g in self.page_hash if start <= g < end]:
            for sp in list(self.page_hash.get(gfn, ())):
                self.prepare_zap_page(sp, invalid)
        if flush and not invalid:
            self.flush_remote_tlbs()
        self.commit_zap_page(invalid)

    def make_mmu_pages_available(self) -> None:
        """Recycle the oldest shadow pages when the quota runs low (mmu_recycled)."""
        avail = self.n_max_mmu_pages - self.n_used_mmu_pages
        if avail >= KVM_MIN_FREE_MMU_PAGES:
            return
        want = KVM_REFILL_PAGES - avail
        invalid: list[ShadowPage] = []
        zapped = 0
        for sp in list(self.active_mmu_pages):
            if zapped >= want:
                break
            if sp.root_count or sp not in self.active_mmu_pages:
                continue
            if self.prepare_zap_page(sp, invalid):
                zapped += 1
        self.stats["mmu_recycled"] += zapped
        self.commit_zap_page(invalid)

    # -- emulated writes to shadowed guest tables (kvm/mmu/page_track.py) ------------------------------
    def track_write(self, gpa: int, nbytes: int, as_id: int = 0, pae: bool = False) -> None:
        """kvm_mmu_track_write (see kvm/mmu/page_track.py)."""
        kvm_mmu_track_write(self, gpa, nbytes, as_id, pae)

    def flush_remote_tlbs(self) -> None:
        self.stats["remote_tlb_flush_requests"] += 1
        self.stats["remote_tlb_flush"] += 1
        self.vm.request_all("KVM_REQ_TLB_FLUSH")
