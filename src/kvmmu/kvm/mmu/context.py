"""The per-vCPU MMU (`struct kvm_mmu`): roles, roots, cached roots, sync and INVLPG.

Shadow paging builds PAE-or-wider tables: a 32-bit or PAE guest runs on a PAE root (four PDPTEs in
`pae_root`, each pointing at a level-2 shadow page; a 32-bit guest's page directory is shadowed by
four quadrants), 4- and 5-level guests on a root of the same depth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ...arch.bits import PT64_ADDR_MASK, PT_PAGE_SIZE_MASK
from ...arch.modes import PagingContext
from ...arch.walker import Walk
from ...errors import KvmBug
from .direct import kvm_tdp_page_fault, nonpaging_gva_to_gpa, nonpaging_page_fault
from .gpte import GuestFormat, guest_format
from .mmio_cache import MMIO_GVA_ANY
from .page import (
    ROLE_ACCESS_SHIFT,
    ROLE_DIRECT,
    ROLE_INVALID,
    ROLE_LEVEL_MASK,
    ROLE_PASSTHROUGH,
    ROLE_QUADRANT_SHIFT,
    ShadowPage,
    make_role,
    role_smm,
    trace_fields,
)
from .paging import page_fault, paging_gva_to_gpa, sync_spte
from .shadow_iter import for_each_shadow_entry, for_each_shadow_entry_lockless
from .spte import SHADOW_NONPRESENT_VALUE, SPTE_MMU_PRESENT_MASK

if TYPE_CHECKING:
    from ..vcpu import Vcpu
    from .pf import KvmPageFault

KVM_MMU_NUM_PREV_ROOTS = 3
# Role bits that may differ between an unsync page and the MMU syncing it (kvm_sync_page_check).
_SYNC_ROLE_IGNORE = (ROLE_LEVEL_MASK | (7 << ROLE_ACCESS_SHIFT) | (3 << ROLE_QUADRANT_SHIFT) | ROLE_DIRECT
                     | ROLE_INVALID | ROLE_PASSTHROUGH)


def get_guest_cr3(mmu: VcpuMmu) -> int:
    """get_guest_cr3: the root of the guest's own page tables."""
    return mmu.vcpu.cr3


def kvm_inject_page_fault(mmu: VcpuMmu, addr: int, w: Walk) -> None:
    """kvm_inject_page_fault: a failed walk of the guest's tables is the guest's #PF."""
    mmu.vcpu.inject_page_fault(w.error_code, addr)


class VcpuMmu:
    """root_mmu of one vCPU for shadow paging or TDP (direct); kvm/mmu/nested_ept.py's ShadowEptMmu
    is the guest_mmu that shadows L1's EPT.

    The flavour is chosen once, where the context is built (`init_context`): it assigns struct
    kvm_mmu's ops, and callers call them instead of asking which MMU this is.  Like KVM's, each op
    takes the MMU as its first argument.
    """

    # What the MMU's fault address means and how a fault is fixed (ept_page_fault, paging64_page_fault,
    # nonpaging_page_fault, kvm_tdp_page_fault).
    page_fault: Callable[[VcpuMmu, KvmPageFault], int]
    # The emulator's translation through this MMU's guest tables (mmu->gva_to_gpa): the gpa, or the
    # failed walk for the caller to deliver (inject_page_fault); None when the MMU delivered the
    # fault itself (nested_mmu: to L2, or as an EPT exit to L1).
    gva_to_gpa: Callable[[VcpuMmu, int, int], int | Walk | None]
    # Re-reading one gpte of an unsync page; None for a direct MMU, which has no gptes.
    sync_spte: Callable[[VcpuMmu, ShadowPage, int], int] | None
    # Delivering a failed walk of the shadowed tables: a #PF to the guest, or an EPT exit to L1.
    inject_page_fault: Callable[[VcpuMmu, int, Walk], None]
    # The root of the tables this MMU shadows: CR3, or L1's EPTP.
    get_guest_pgd: Callable[[VcpuMmu], int]
    # The tables this MMU shadows (the guest's, or L1's EPT) and their gpte format, set by init_context,
    # which runs before anything walks them.
    walk_ctx: PagingContext
    gfmt: GuestFormat

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.vm = vcpu.vm
        self.kvm = vcpu.vm.mmu
        self.masks = self.kvm.masks
        self.cpu_role: PagingContext | None = None
        self.cpu_key: tuple = ()
        self.root_role = 0
        self.direct = False
        self.root_level = 0
        self.root_sp: ShadowPage | None = None
        self.pae_root = 0                       # host address of the 4-entry PAE root page, 0 if none
        self.pae_sps: list[ShadowPage | None] = [None] * 4
        self.root_hpa = 0                       # what the CPU's CR3 points at; 0 = no root loaded
        self.pgd = 0
        self.prev_roots: list[tuple[int, ShadowPage]] = []
        self._pdptrs: tuple[int, ...] = (0, 0, 0, 0)
        self.hw_ctx: PagingContext | None = None         # the CPU's view of KVM's shadow tables
        self.hw_guest_ctx: PagingContext | None = None   # the CPU's view of the guest's tables (TDP)
        self.shadow_zero_check = PagingContext(
            "ept4" if self.masks.ept else "4level", maxphyaddr=self.vm.host.maxphyaddr, nxe=True)
        # Until the first init_context, an indirect MMU over the guest's tables (direct is False).
        self.page_fault = page_fault
        self.gva_to_gpa = paging_gva_to_gpa
        self.sync_spte = sync_spte
        self.inject_page_fault = kvm_inject_page_fault
        self.get_guest_pgd = get_guest_cr3

    @property
    def pdptrs(self) -> tuple[int, ...]:
        """PAE's PDPTEs as loaded at the last CR3 load (KVM's cached PDPTRs)."""
        return self._pdptrs

    @pdptrs.setter
    def pdptrs(self, value: tuple[int, ...]) -> None:
        # load_pdptrs: new PDPTEs invalidate the PAE root built from the old ones.
        if value != self._pdptrs:
            self._pdptrs = value
            if self.root_level == 3 and not self.direct and self.root_hpa:
                self.free_current_root()

    # -- role computation (kvm_init_mmu) ----------------------------------------------------------
    def init_context(self) -> None:
        v = self.vcpu
        ctx = PagingContext.from_regs(v.cr0, v.cr4, v.efer, maxphyaddr=self.vm.guest_maxphyaddr,
                                      gbpages=self.vm.guest_gbpages, ad_policy="kvm")
        self.cpu_role = ctx
        self.cpu_key = ctx.key
        self.walk_ctx = ctx
        # kvm_init_mmu makes the same choice (the nested MMU is ShadowEptMmu's, which overrides this).
        if self.vm.tdp_enabled:
            self._init_tdp(ctx)
        else:
            self._init_shadow(ctx)
        self.gfmt = guest_format(self.walk_ctx)

    def _init_shadow(self, ctx: PagingContext) -> None:
        """init_kvm_softmmu: shadow the guest's tables (a direct MMU while guest paging is off)."""
        mode = ctx.mode
        nonpaging = mode.root_level == 0
        level = max(mode.root_level, 3)
        self.direct = nonpaging
        if nonpaging:
            self.page_fault, self.gva_to_gpa, self.sync_spte = nonpaging_page_fault, nonpaging_gva_to_gpa, None
        else:
            self.page_fault, self.gva_to_gpa, self.sync_spte = page_fault, paging_gva_to_gpa, sync_spte
        self.root_level = level
        # KVM sets root_role.efer_nx=1 for every shadow MMU (the CPU runs the guest with EFER.NX=1), so
        # vCPUs whose EFER.NXE differ share shadow pages and one can use an spte built by a walk in
        # which XD was not a reserved bit.  Unless asked for KVM's behaviour, the role keeps NXE.
        efer_nx = nonpaging or not mode.has_nx or ctx.nxe or self.vm.kvm_deviations
        cr4_pse = mode.name == "32bit" and ctx.pse and not self.vm.kvm_deviations
        self.root_role = make_role(level, has_4_byte_gpte=mode.name == "32bit", direct=nonpaging, efer_nx=efer_nx,
                                   cr4_pse=cr4_pse,
                                   cr0_wp=ctx.wp, smep_andnot_wp=ctx.smep and not ctx.wp,
                                   smap_andnot_wp=ctx.smap and not ctx.wp,
                                   pke_andnot_wp=ctx.pkeys_active and not ctx.wp)
        hw_mode = {3: "pae", 4: "4level", 5: "5level"}[level]
        # The CPU runs the guest with CR0.WP=1 and EFER.NX=1; SMEP/SMAP/PKE are the guest's, except with
        # guest paging off: they do nothing then (SDM 4.6), so vmx_set_cr4 clears them in hardware CR4,
        # or a supervisor access would fault on the direct map's user sptes forever.
        paging = not nonpaging
        self.hw_ctx = PagingContext(hw_mode, maxphyaddr=self.vm.host.maxphyaddr, nxe=True, wp=True,
                                    smep=ctx.smep and paging, smap=ctx.smap and paging, pke=ctx.pke and paging,
                                    ad_policy="hardware")

    def _init_tdp(self, ctx: PagingContext) -> None:
        """init_kvm_tdp_mmu: a direct MMU over gpas; the guest's tables are walked only to emulate."""
        self.direct = True
        self.page_fault, self.sync_spte = kvm_tdp_page_fault, None
        self.gva_to_gpa = nonpaging_gva_to_gpa if ctx.mode.root_level == 0 else paging_gva_to_gpa
        self.root_level = self.vm.tdp_level
        self.root_role = make_role(self.root_level, direct=True, cr0_wp=True,
                                   ad_disabled=not self.masks.accessed)
        self.hw_ctx = None
        v = self.vcpu
        self.hw_guest_ctx = PagingContext.from_regs(v.cr0, v.cr4, v.efer, maxphyaddr=self.vm.guest_maxphyaddr,
                                                    gbpages=self.vm.guest_gbpages, ad_policy="hardware")

    @property
    def role_key(self) -> tuple:
        return self.cpu_key

    # -- roots ---------------------------------------------------------------------------------------
    @property
    def root_valid(self) -> bool:
        if not self.root_hpa:
            return False
        if self.root_sp is not None:
            return not self.kvm.is_obsolete(self.root_sp)
        return not any(sp is not None and self.kvm.is_obsolete(sp) for sp in self.pae_sps)

    def load(self) -> None:
        """kvm_mmu_load: allocate the root(s) for the current CR3 and sync them."""
        if self.cpu_role is None:
            self.init_context()
        self.kvm.make_mmu_pages_available()
        # kvm_mmu_load chooses by root_role.direct too.
        if self.direct:
            self._alloc_direct_roots()
        else:
            self._alloc_shadow_roots()
        self.sync_roots()

    def _alloc_direct_roots(self) -> None:
        """mmu_alloc_direct_roots: gfn-indexed roots (TDP, or shadow paging with guest paging off)."""
        self.pgd = 0
        tdp_mmu = self.kvm.tdp_mmu
        if tdp_mmu is not None:
            self._set_root(tdp_mmu.get_vcpu_root(self))
        elif self.root_level >= 4:
            self._set_root(self._get_root(0, self.root_role))
        else:
            role = (self.root_role & ~ROLE_LEVEL_MASK) | 2
            self._alloc_pae_root([(i << 18, role) for i in range(4)])

    def _alloc_shadow_roots(self) -> None:
        """mmu_alloc_shadow_roots: roots that shadow the guest's top-level table (or L1's EPT)."""
        pgd = self.pgd = self.get_guest_pgd(self)
        if self.root_level >= 4:
            self._set_root(self._get_root((pgd & PT64_ADDR_MASK) >> 12, self.root_role))
            return
        role = (self.root_role & ~ROLE_LEVEL_MASK) | 2
        roots: list[tuple[int, int] | None]
        if self.cpu_role is not None and self.cpu_role.mode.name == "32bit":
            # Four level-2 shadow pages, one per quadrant of the guest's 4 KiB page directory.
            roots = [((pgd & 0xFFFFF000) >> 12, role | (i << ROLE_QUADRANT_SHIFT)) for i in range(4)]
        else:
            roots = [((pdpte & PT64_ADDR_MASK) >> 12, role) if pdpte & 1 else None for pdpte in self.pdptrs]
        self._alloc_pae_root(roots)

    def _set_root(self, sp: ShadowPage) -> None:
        self.root_sp = sp
        self.root_hpa = sp.hpa

    def _alloc_pae_root(self, roots: list[tuple[int, int] | None]) -> None:
        """The 4-entry PAE root: entry i points at a level-2 shadow page for roots[i] (gfn, role)."""
        if not self.pae_root:
            self.pae_root = self.vm.host.alloc_kernel_page(dma32=True)
        for i, root in enumerate(roots):
            if root is None:
                self.pae_sps[i] = None
                self.kvm.write_spte(self.pae_root + 8 * i, 0)
                continue
            sp = self._get_root(*root)
            self.pae_sps[i] = sp
            self.kvm.write_spte(self.pae_root + 8 * i, sp.hpa | 1)
        self.root_hpa = self.pae_root

    def _get_root(self, gfn: int, role: int) -> ShadowPage:
        sp = self.get_shadow_page(gfn, role)
        sp.root_count += 1
        return sp

    def roots(self) -> list[ShadowPage]:
        if self.root_sp is not None:
            return [self.root_sp]
        return [sp for sp in self.pae_sps if sp is not None]

    def _put_root(self, sp: ShadowPage) -> None:
        tdp_mmu = self.kvm.tdp_mmu
        if sp.tdp and tdp_mmu is not None:
            tdp_mmu.put_root(sp)
            return
        sp.root_count -= 1
        if sp.root_count == 0 and sp.invalid:
            invalid: list[ShadowPage] = []
            self.kvm.prepare_zap_page(sp, invalid)
            self.kvm.commit_zap_page(invalid)

    def free_current_root(self) -> None:
        for sp in self.roots():
            self._put_root(sp)
        self.root_sp = None
        self.pae_sps = [None] * 4
        self.root_hpa = 0

    def unload(self) -> None:
        """kvm_mmu_unload: drop the current and all cached roots."""
        self.free_current_root()
        for _, sp in self.prev_roots:
            self._put_root(sp)
        self.prev_roots.clear()
        self.vcpu.mmio_cache.clear(MMIO_GVA_ANY)

    def free_obsolete_roots(self) -> None:
        if self.root_hpa and not self.root_valid:
            self.free_current_root()
        keep = []
        for pgd, sp in self.prev_roots:
            if self.kvm.is_obsolete(sp):
                self._put_root(sp)
            else:
                keep.append((pgd, sp))
        self.prev_roots = keep

    def new_pgd(self, new_pgd: int) -> bool:
        """kvm_mmu_new_pgd: switch to a cached root if one matches (fast_pgd_switch); else drop it.

        Returns True if a cached root was reused.
        """
        self.vcpu.mmio_cache.clear(MMIO_GVA_ANY)
        reused = False
        if self.root_level >= 4 and self.root_sp is not None and not self.direct:
            current = (self.pgd, self.root_sp)
            for i, (pgd, sp) in enumerate(self.prev_roots):
                if pgd == new_pgd and sp.role == self.root_role and not self.kvm.is_obsolete(sp):
                    del self.prev_roots[i]
                    self.prev_roots.insert(0, current)
                    self.root_sp, self.root_hpa, self.pgd = sp, sp.hpa, new_pgd
                    reused = True
                    break
            else:
                self.prev_roots.insert(0, current)
                if len(self.prev_roots) > KVM_MMU_NUM_PREV_ROOTS:
                    _, old = self.prev_roots.pop()
                    self._put_root(old)
                self.root_sp = None
                self.root_hpa = 0
        else:
            self.free_current_root()
        return reused

    # -- the shadow-page hash (kvm_mmu_get_shadow_page) ------------------------------------------------
    def get_shadow_page(self, gfn: int, role: int) -> ShadowPage:
        kvm = self.kvm
        invalid: list[ShadowPage] = []
        found = None
        for sp in list(kvm.page_hash.get(gfn, ())):
            if kvm.is_obsolete(sp) or sp not in kvm.active_mmu_pages:
                continue
            if sp.role != role:
                # The gfn now also serves as an upper-level table: it must not stay unsync.
                if role & ROLE_LEVEL_MASK > 1 and sp.unsync:
                    kvm.prepare_zap_page(sp, invalid)
                continue
            if sp.unsync:
                # Bring the page up to date but leave it unsync (and its gfn writable): the
                # write protection waits until the guest flushes its TLB (mmu_sync_children).
                r = self.sync_page(sp, invalid)
                if r < 0:
                    kvm.prepare_zap_page(sp, invalid)
                    continue
                if r > 0:
                    kvm.flush_remote_tlbs()
            found = sp
            break
        kvm.commit_zap_page(invalid)
        if found is not None:
            if self.vm.trace.enabled:
                self.vm.trace.emit("kvm_mmu_get_page", created=False, **trace_fields(found))
            return found
        kvm.stats["mmu_cache_miss"] += 1
        return kvm.alloc_page(gfn, role)

    # -- walking KVM's own tables ------------------------------------------------------------------
    def shadow_walk(self, addr: int, root_hpa: int | None = None) -> Iterator[tuple[int, int]]:
        """(level, spte) from the root down, following non-leaf sptes (for_each_shadow_entry)."""
        return ((it.level, spte) for it, spte in for_each_shadow_entry_lockless(self, addr, root_hpa))

    def shadow_walk_ptrs(self, addr: int, root_hpa: int | None = None) -> Iterator[tuple[int, int]]:
        """(level, sptep) from the root down; each spte is read after the caller has seen its sptep."""
        return ((it.level, it.sptep) for it in for_each_shadow_entry(self, addr, root_hpa))

    # -- sync (kvm_mmu_sync_roots, mmu_sync_children, kvm_sync_page) ----------------------------------
    def sync_roots(self) -> None:
        if self.direct:             # kvm_mmu_sync_roots tests root_role.direct too
            return
        self.vcpu.mmio_cache.clear(MMIO_GVA_ANY)
        for sp in self.roots():
            if sp.unsync_children:
                self.sync_children(sp)

    def sync_children(self, parent: ShadowPage) -> bool:
        """Sync every unsync page below parent; False if the walk must be retried (a page was zapped)."""
        kvm = self.kvm
        pages: list[ShadowPage] = []
        self._collect_unsync(parent, pages)
        if not pages:
            return True
        protected = False
        for sp in pages:
            protected |= kvm.write_protect_gfn(sp.gfn, role_smm(sp.role))
        if protected:
            kvm.flush_remote_tlbs()
        invalid: list[ShadowPage] = []
        flush = False
        for sp in pages:
            if sp.invalid:
                continue
            kvm.unlink_unsync_page(sp)
            r = self.sync_page(sp, invalid)
            if r < 0:
                kvm.prepare_zap_page(sp, invalid)
            else:
                flush |= r > 0
        if invalid:
            kvm.commit_zap_page(invalid)
        elif flush:
            kvm.flush_remote_tlbs()
        return True

    def _collect_unsync(self, sp: ShadowPage, out: list[ShadowPage]) -> None:
        kvm = self.kvm
        for index in sorted(sp.unsync_children):
            spte = kvm.read_spte(sp.sptep(index))
            sp.unsync_children.discard(index)
            if not spte & SPTE_MMU_PRESENT_MASK or (spte & PT_PAGE_SIZE_MASK and sp.level > 1):
                continue
            child = kvm.pages_by_pfn.get(spte >> 12 & ((1 << 40) - 1))
            if child is None:
                raise KvmBug(f"unsync child bit {index} of {sp!r} points at no shadow page")
            if child.unsync_children:
                self._collect_unsync(child, out)
            if child.unsync and child not in out:
                # mmu_pages_add: a page reached by two paths (guest tables that map a table twice, or
                # themselves) is collected once, or it would be synced and uncounted twice.
                out.append(child)

    def sync_page(self, sp: ShadowPage, invalid: list[ShadowPage]) -> int:
        """kvm_sync_page: re-read every gpte of an unsync page; <0 means 'zap it', >0 'flush'."""
        sync = self.sync_spte
        if sp.direct or sync is None or (sp.role ^ self.root_role) & ~_SYNC_ROLE_IGNORE:
            return -1               # kvm_sync_page_check
        flush = 0
        # sync_spte does nothing for an spte that is neither present nor MMIO, and writes only its own.
        for i in self.kvm.live_spte_indices(sp):
            r = sync(self, sp, i)
            if r < 0:
                return -1
            flush |= r
        if self.vm.trace.enabled:
            self.vm.trace.emit("kvm_mmu_sync_page", **trace_fields(sp))
        return flush

    def invalidate_addr(self, gva: int, current_only: bool = False) -> None:
        """The MMU half of INVLPG (kvm_mmu_invlpg: every root, and the MMIO cache) or, with
        `current_only`, of an injected #PF (kvm_mmu_invalidate_addr on the current root): resync the
        leaf spte for gva where its page is unsync."""
        if not current_only:
            self.vcpu.mmio_cache.clear(gva)
        sync = self.sync_spte
        if sync is None:
            return
        kvm = self.kvm
        roots = [self.root_hpa] if current_only else [self.root_hpa] + [sp.hpa for _, sp in self.prev_roots]
        for root in roots:
            if not root:
                continue
            for it in for_each_shadow_entry(self, gva, root):
                sp = kvm.sptep_to_sp(it.sptep)
                if sp.unsync:
                    r = sync(self, sp, it.index)
                    if r < 0:
                        kvm.mmu_page_zap_pte(sp, it.sptep, None)
                    if r:
                        kvm.flush_remote_tlbs()
                if not sp.unsync_children:
                    break

    def clear_nonpresent(self, sptep: int) -> None:
        self.kvm.write_spte(sptep, SHADOW_NONPRESENT_VALUE)
