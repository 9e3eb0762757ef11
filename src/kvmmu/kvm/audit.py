"""vm.audit(): the invariants of a healthy KVM MMU, checked from the tables themselves.

Raises AuditError naming the spte, the shadow page and the rule.  The TDP MMU's pages are checked
by tdp_audit.py; the rules every spte obeys in either MMU by the walk in audit_walk.py.  Here: the
shadow MMU's own (rmap, unsync pages, write protection of shadowed guest tables, the guest's and the
role's access) and the VM-wide ones (statistics, TLBs, MMIO caches).  An unsync page may legitimately
lag behind the guest's tables (the guest has not flushed yet), so only synced pages are compared
with the guest's entries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch.bits import ACC_ALL, ACC_EXEC_MASK, ACC_USER_MASK, ACC_WRITE_MASK
from ..arch.index import hpa_to_pfn
from .audit_walk import TableAudit, fail
from .memslots import KVM_MEM_LOG_DIRTY_PAGES
from .mmu.hugepage import KVM_MAX_HUGEPAGE_LEVEL, lpage_index
from .mmu.page import ROLE_CR0_WP, role_access, role_smm
from .mmu.spte import SPTE_MMU_PRESENT_MASK, is_writable_pte, spte_access, spte_to_pfn
from .tdp_audit import audit_tdp_mmu

if TYPE_CHECKING:
    from .memslots import Memslot
    from .mmu.page import ShadowPage
    from .vm import VM

# What a guest grant must bound besides W (W has the CR0.WP=0 exception below).
_ACC_XU = ACC_EXEC_MASK | ACC_USER_MASK


def audit_vm(vm: VM) -> None:
    kvm = vm.mmu
    mem = vm.host.mem
    leaves = audit_tdp_mmu(vm)
    walk = _ShadowAudit(vm, leaves)
    unsync = 0
    for sp in list(kvm.pages_by_pfn.values()):
        if sp.tdp:
            continue                    # checked by audit_tdp_mmu
        if sp.unsync:
            unsync += 1
            if sp.level != 1:
                fail(f"{sp!r} is unsync but not a 4 KiB page table")
        walk.audit_table(sp)
        for parent in sp.parent_ptes:
            pspte = mem.read(parent, 8)
            if not pspte & SPTE_MMU_PRESENT_MASK or spte_to_pfn(pspte) != hpa_to_pfn(sp.hpa):
                fail(f"{sp!r} records parent {parent:#x} whose spte {pspte:#x} does not point at it")
    rmap_seen = walk.rmap_seen
    for key, sptes in kvm.rmap.items():
        if rmap_seen.get(key, set()) != sptes:
            fail(f"rmap of gfn {key[1]:#x} holds {sorted(map(hex, sptes))}, the tables map it from "
                 f"{sorted(map(hex, rmap_seen.get(key, set())))}")
    for key in rmap_seen:
        if key not in kvm.rmap:
            fail(f"gfn {key[1]:#x} is mapped but has no rmap entry")
    for as_id, gfn in walk.writable_gfns:
        gfns = [gfn] + [g for _, g in kvm.host_page_aliases(gfn, as_id)]    # [] under kvm_deviations
        for sp in [sp for g in gfns for sp in kvm.indirect_pages_for_gfn(g)]:
            if sp.level > 1 or not sp.unsync:
                fail(f"gfn {gfn:#x} is shadowed by {sp!r} yet mapped writable")
    for name, n in zip(("pages_4k", "pages_2m", "pages_1g"), leaves, strict=True):
        if vm.stats[name] != n:
            fail(f"{name} says {vm.stats[name]} but the tables hold {n} such leaf sptes")
    _check_disallow_lpage(vm)
    if vm.stats["mmu_unsync"] != unsync:
        fail(f"mmu_unsync says {vm.stats['mmu_unsync']} but {unsync} shadow pages are unsync")
    if kvm.n_used_mmu_pages != len(kvm.active_mmu_pages):
        fail(f"n_used_mmu_pages {kvm.n_used_mmu_pages} != {len(kvm.active_mmu_pages)} active pages")
    _check_tlbs(vm)
    _check_mmio_caches(vm)


class _ShadowAudit(TableAudit):
    """Each shadow page on its own (the VM's page list holds them all); collects the rmap the tables
    imply and the gfns they map writable."""

    def __init__(self, vm: VM, leaves: list[int]) -> None:
        super().__init__(vm, leaves)
        self.rmap_seen: dict[tuple[int, int], set[int]] = {}
        self.writable_gfns: set[tuple[int, int]] = set()

    def mmio(self, sp: ShadowPage, i: int, spte: int) -> None:
        m = self.vm.mmu.masks
        if m.gen is not None and (spte & ~m.gen.spte_mask) >> 52:
            fail(f"MMIO spte {spte:#x} has bits above 51 outside the generation field")

    def leaf(self, sp: ShadowPage, i: int, sptep: int, spte: int, gfn: int, slot: Memslot) -> None:
        key = (role_smm(sp.role), gfn)
        self.rmap_seen.setdefault(key, set()).add(sptep)
        _check_access(self.vm, sp, i, spte, gfn, slot)
        if is_writable_pte(spte):
            self.writable_gfns.add(key)
            if sp.level > 1 and (key[0], sp.level, lpage_index(gfn, sp.level)) in self.vm.mmu.disallow_lpage:
                fail(f"writable huge spte {spte:#x} in {sp!r}[{i}] covers a shadowed guest table's gfn")


def _check_disallow_lpage(vm: VM) -> None:
    """Each huge frame's disallow count is the number of accounted (shadowed) guest tables in it."""
    kvm = vm.mmu
    want: dict[tuple[int, int, int], int] = {}
    for sp in kvm.active_mmu_pages:
        if sp.accounted:
            for level in range(2, KVM_MAX_HUGEPAGE_LEVEL + 1):
                key = (role_smm(sp.role), level, lpage_index(sp.gfn, level))
                want[key] = want.get(key, 0) + 1
    if want != kvm.disallow_lpage:
        bad = sorted(set(want.items()) ^ set(kvm.disallow_lpage.items()))[:4]
        fail(f"disallow_lpage counts disagree with the shadowed guest tables: {bad}")


def _check_mmio_caches(vm: VM) -> None:
    """The per-vCPU MMIO cache: page-aligned gva, never a gva for a nested guest."""
    for v in vm.vcpus:
        gva = v.mmio_cache.mmio_gva
        if gva & 0xFFF:
            fail(f"vcpu{v.id}'s mmio_gva {gva:#x} is not page aligned")
        if v.mmu_is_nested and gva:
            fail(f"vcpu{v.id} caches mmio_gva {gva:#x} while running a nested guest")


def _check_access(vm: VM, sp: ShadowPage, i: int, spte: int, gfn: int, slot: Memslot) -> None:
    """A present leaf grants no more than the dirty log, the role and the guest's own entry allow."""
    acc = spte_access(vm.mmu.masks, spte)
    if acc & ACC_WRITE_MASK and sp.level > 1 and slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
        # make_spte marks one gfn dirty per writable spte (its WARN: "enforced by hugepage_adjust").
        fail(f"spte {spte:#x} in {sp!r}[{i}] is a writable {sp.level}-level leaf in dirty-logged slot {slot.id}")
    role_acc = role_access(sp.role)
    wp_trick = not sp.role & ROLE_CR0_WP and not acc & ACC_USER_MASK      # CR0.WP=0: kernel-only writable
    if acc & ~role_acc & _ACC_XU or (acc & ACC_WRITE_MASK and not role_acc & ACC_WRITE_MASK and not wp_trick):
        fail(f"spte {spte:#x} in {sp!r}[{i}] grants {acc:03b}, more than the role's {role_acc:03b}")
    if sp.shadowed_translation is not None and not sp.unsync:
        recorded = sp.shadowed_translation[i] & ACC_ALL
        if acc & ~recorded & _ACC_XU or (acc & ACC_WRITE_MASK and not recorded & ACC_WRITE_MASK and not wp_trick):
            fail(f"spte {spte:#x} in {sp!r}[{i}] grants {acc:03b}, more than the guest's {recorded:03b}")


def _check_tlbs(vm: VM) -> None:
    """No TLB entry reaches host memory outside this VM's memslots."""
    ranges = [(s.userspace_addr >> 12, (s.userspace_addr >> 12) + s.npages) for s in vm.memslots.all_slots()
              if not s.invalid]
    for v in vm.vcpus:
        if v.requests & {"KVM_REQ_TLB_FLUSH", "KVM_REQ_TLB_FLUSH_GUEST", "KVM_REQ_TLB_FLUSH_CURRENT",
                         "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS"}:
            continue            # flushed before this vCPU can enter the guest again (a new root is flushed too)
        for vpn, entry in v.cpu.tlb.items():
            page = hpa_to_pfn(entry[0])
            if not any(lo <= page < hi for lo, hi in ranges):
                fail(f"vcpu{v.id}'s TLB maps page {vpn:#x} to host frame {page:#x}, outside the VM's memslots")
        # The CPU's cached guest-physical mappings (TDP): each is the memslot's own page for that gfn.
        for gfn, hpa in getattr(v.cpu, "gpa_cache", {}).items():
            slot = None if v.mmu_is_nested else vm.memslots.spaces[v.as_id].search(gfn)
            if v.mmu_is_nested:
                if not any(lo <= hpa_to_pfn(hpa) < hi for lo, hi in ranges):
                    fail(f"vcpu{v.id} caches L2 gfn {gfn:#x} at host frame {hpa_to_pfn(hpa):#x}, "
                          "outside the VM's memslots")
            elif slot is None or slot.invalid or slot.gfn_to_hva(gfn) != hpa:
                fail(f"vcpu{v.id} caches gfn {gfn:#x} at host address {hpa:#x}, not where its memslot maps it")
