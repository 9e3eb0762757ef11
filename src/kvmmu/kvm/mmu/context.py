"""The per-vCPU MMU (`struct kvm_mmu`): roles, roots, cached roots, sync and INVLPG.

Shadow paging builds PAE-or-wider tables: a 32-bit or PAE guest runs on a PAE root (four PDPTEs in
`pae_root`, each pointing at a level-2 shadow page; a 32-bit guest's page directory is shadowed by
four quadrants), 4- and 5-level guests on a root of the same depth.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ...arch.bits import PT64_ADDR_MASK, PT_PAGE_SIZE_MASK
from ...arch.modes import PagingContext
from ...errors import KvmBug
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
from .paging import sync_spte
from .shadow_iter import for_each_shadow_entry, for_each_shadow_entry_lockless
from .spte import SHADOW_NONPRESENT_VALUE, SPTE_MMU_PRESENT_MASK

if TYPE_CHECKING:
    from ..vcpu import Vcpu

KVM_MMU_NUM_PREV_ROOTS = 3
# Role bits that may differ between an unsync page and the MMU syncing it (kvm_sync_page_check).
_SYNC_ROLE_IGNORE = (ROLE_LEVEL_MASK | (7 << ROLE_ACCESS_SHIFT) | (3 << ROLE_QUADRANT_SHIFT) | ROLE_DIRECT
                     | ROLE_INVALID | ROLE_PASSTHROUGH)


class VcpuMmu:
    """root_mmu of one vCPU for shadow paging or TDP (direct)."""

    def __init__(self, vcpu: Vcpu, nested_eptp: int | None = None) -> None:
        self.vcpu = vcpu
        self.nested_eptp = nested_eptp          # set: this is guest_mmu, shadowing L1's EPT for L2
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
        self.walk_ctx: PagingContext | None = None       # the tables this MMU shadows (guest or L1 EPT)
        self.gfmt: GuestFormat | None = None
        self.shadow_zero_check = PagingContext(
            "ept4" if self.masks.ept else "4level", maxphyaddr=self.vm.host.maxphyaddr, nxe=True)

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
        if self.nested_eptp is not None:
            self._init_nested_ept(ctx)
        elif self.vm.tdp_enabled:
            self._init_tdp(ctx)
        else:
            self._init_shadow(ctx)
        self.gfmt = guest_format(self.walk_ctx)

    def walk_root(self) -> int:
        return self.nested_eptp if self.nested_eptp is not None else self.vcpu.cr3

    def _init_nested_ept(self, ctx: PagingContext) -> None:
        """guest_mmu: an indirect MMU over L1's EPT; faults arrive with an L2 physical address."""
        eptp = self.nested_eptp
        levels = ((eptp >> 3) & 7) + 1
        ad = bool(eptp & (1 << 6))
        self.walk_ctx = PagingContext(f"ept{levels}", maxphyaddr=self.vm.guest_maxphyaddr, ept_ad=ad,
                                      gbpages=self.vm.guest_gbpages, ad_policy="kvm")
        self.direct = False
        self.root_level = levels
        self.root_role = make_role(levels, direct=False, guest_mode=True, cr0_wp=True, ad_disabled=not ad)
        self.hw_ctx = None
        v = self.vcpu
        self.hw_guest_ctx = PagingContext.from_regs(v.cr0, v.cr4, v.efer, maxphyaddr=self.vm.guest_maxphyaddr,
                                                    gbpages=self.vm.guest_gbpages, ad_policy="hardware")

    def _init_shadow(self, ctx: PagingContext) -> None:
        mode = ctx.mode
        nonpaging = mode.root_level == 0
        level = max(mode.root_level, 3)
        self.direct = nonpaging
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
        self.direct = True
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
        v = self.vcpu
        if self.nested_eptp is not None:
            self.root_sp = self._get_root((self.nested_eptp & PT64_ADDR_MASK) >> 12, self.root_role)
            self.root_hpa = self.root_sp.hpa
            self.pgd = self.nested_eptp
            self.sync_roots()
            return
        if self.vm.tdp_enabled:
            tdp_mmu = self.kvm.tdp_mmu
            self.root_sp = tdp_mmu.get_vcpu_root(self) if tdp_mmu is not None else self._get_root(0, self.root_role)
            self.root_hpa = self.root_sp.hpa
            self.pgd = 0
            return
        mode = self.cpu_role.mode
        self.pgd = v.cr3
        if self.root_level >= 4:
            gfn = (v.cr3 & PT64_ADDR_MASK) >> 12
            self.root_sp = self._get_root(gfn, self.root_role)
            self.root_hpa = self.root_sp.hpa
        else:
            if not self.pae_root:
                self.pae_root = self.vm.host.alloc_kernel_page(dma32=True)
            for i in range(4):
                if self.direct:
                    gfn, role = i << 18, (self.root_role & ~ROLE_LEVEL_MASK) | 2
                elif mode.name == "32bit":
                    gfn = (v.cr3 & 0xFFFFF000) >> 12
                    role = (self.root_role & ~ROLE_LEVEL_MASK) | 2 | (i << ROLE_QUADRANT_SHIFT)
                else:
                    pdpte = self.pdptrs[i]
                    if not pdpte & 1:
                        self.pae_sps[i] = None
                        self.kvm.write_spte(self.pae_root + 8 * i, 0)
                        continue
                    gfn = (pdpte & PT64_ADDR_MASK) >> 12
                    role = (self.root_role & ~ROLE_LEVEL_MASK) | 2
                sp = self._get_root(gfn, role)
                self.pae_sps[i] = sp
                self.kvm.write_spte(self.pae_root + 8 * i, sp.hpa | 1)
            self.root_hpa = self.pae_root
        self.sync_roots()

    def _get_root(self, gfn: int, role: int) -> ShadowPage:
        sp = self.get_shadow_page(gfn, role)
        sp.root_count += 1
        return sp

    def roots(self) -> list[ShadowPage]:
        if self.root_sp is not None:
            return [self.root_sp]
        return [sp for sp in self.pae_sps if sp is not None]

    def _put_root(self, sp: ShadowPage) -> None:
        if sp.tdp:
            self.kvm.tdp_mmu.put_root(sp)
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
        if self.direct:
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
        if sp.direct or (sp.role ^ self.root_role) & ~_SYNC_ROLE_IGNORE:
            return -1
        flush = 0
        # sync_spte does nothing for an spte that is neither present nor MMIO, and writes only its own.
        for i in self.kvm.live_spte_indices(sp):
            r = sync_spte(self, sp, i)
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
        if self.direct:
            return
        kvm = self.kvm
        roots = [self.root_hpa] if current_only else [self.root_hpa] + [sp.hpa for _, sp in self.prev_roots]
        for root in roots:
            if not root:
                continue
            for it in for_each_shadow_entry(self, gva, root):
                sp = kvm.sptep_to_sp(it.sptep)
                if sp.unsync:
                    r = sync_spte(self, sp, it.index)
                    if r < 0:
                        kvm.mmu_page_zap_pte(sp, it.sptep, None)
                    if r:
                        kvm.flush_remote_tlbs()
                if not sp.unsync_children:
                    break

    def clear_nonpresent(self, sptep: int) -> None:
        self.kvm.write_spte(sptep, SHADOW_NONPRESENT_VALUE)
