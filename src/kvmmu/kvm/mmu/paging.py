"""Shadow paging (paging_tmpl.h): the guest walk on a fault, FNAME(fetch), prefetch and sync.

The guest walk is the arch walker reading guest memory through memslots (KVM's A/D rules:
A/D only after a successful walk).  Shadow pages for guest tables carry, in their role, the access
accumulated above them; guest large pages are mapped by direct shadow pages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...arch.bits import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    PFERR_IMPLICIT_ACCESS,
    PFERR_PK_MASK,
    PFERR_RSVD_MASK,
    PFERR_WRITE_MASK,
    PT64_PKEY_MASK,
    PT64_PKEY_SHIFT,
    PT_PAGE_SIZE_MASK,
    X86_CR4_LA57,
)
from ...arch.index import gfn_to_gpa, gpa_to_gfn, round_gfn_for_level
from ...arch.walker import Walk, walk
from ...errors import KvmBug
from .gpte import EPT_TO_ACC
from .hugepage import kvm_mmu_hugepage_adjust
from .install import (
    build_spte,
    direct_pte_prefetch,
    faultin_pfn,
    get_child_sp,
    mark_mmio_spte,
    mmu_set_spte,
    prefetch_slot,
)
from .page import ROLE_ACCESS_SHIFT, ROLE_QUADRANT_SHIFT, ShadowPage, role_pkey
from .pf import (
    RET_PF_CONTINUE,
    RET_PF_EMULATE,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    KvmPageFault,
)
from .shadow_iter import ShadowWalk, for_each_shadow_entry
from .spte import (
    SHADOW_NONPRESENT_VALUE,
    SPTE_MMU_PRESENT_MASK,
    get_mmio_spte_gfn,
    is_mmio_spte,
)

if TYPE_CHECKING:
    from ..vcpu import Vcpu
    from .context import VcpuMmu


def guest_walk(mmu: VcpuMmu, addr: int, access: int) -> Walk:
    """walk_addr_generic over the tables this MMU shadows, with protect_clean_gpte for non-writes.

    For a shadow MMU that is the guest's own page tables (from CR3); for the MMU that shadows L1's
    EPT it is L1's EPT (from the EPTP), whose R/W/X rights are returned as ACC_* bits.
    """
    vcpu = mmu.vcpu
    vcpu.counters["guest_walks"] += 1
    ctx = mmu.walk_ctx
    pdptrs = mmu.pdptrs if ctx.mode.pae_pdptes else None
    w = walk(ctx, vcpu.pte_reader, mmu.get_guest_pgd(mmu), addr, access, ac=vcpu.ac, pkru=vcpu.pkru, pdptrs=pdptrs)
    trace = vcpu.vm.trace
    if trace.enabled:
        trace.emit("kvm_mmu_pagetable_walk", addr=addr, pferr=access & 0xFFFF_FFFF)
        if w.fault:
            trace.emit("kvm_mmu_walker_error", pferr=w.error_code & 0xFFFF_FFFF)
    if ctx.mode.ept:
        w.pte_access = EPT_TO_ACC[w.pte_access & 7]
        w.pt_access = [EPT_TO_ACC[a & 7] for a in w.pt_access]
    dirty = mmu.gfmt.dirty
    if not w.fault and not access & PFERR_WRITE_MASK and dirty and not w.ptes[w.level] & dirty and ctx.mode.root_level:
        w.pte_access &= ~ACC_WRITE_MASK        # keep clean pages read-only so the first write sets D
    return w


def paging_gva_to_gpa(mmu: VcpuMmu, gva: int, access: int) -> int | Walk:
    """FNAME(gva_to_gpa) for the emulator: the gpa, or the failed walk (KVM's x86_exception), which
    the caller delivers or not (kvm_inject_emulated_page_fault)."""
    w = guest_walk(mmu, walker_address(mmu.vcpu.cr4, gva), access)
    return w if w.fault else w.gpa


def walker_address(cr4: int, gva: int) -> int:
    """KVM's walker indexes the guest tables with bits 47:0 (56:0 with LA57) and never looks above
    them; the arch walker wants the canonical address with the same indices.  Only the second page
    of an emulated access straddling the canonical boundary is non-canonical (noncanonical_tail)."""
    bits = 57 if cr4 & X86_CR4_LA57 else 48
    low = gva & ((1 << bits) - 1)
    return low | (((1 << 64) - 1) ^ ((1 << bits) - 1)) if low >> (bits - 1) else low


def page_fault(mmu: VcpuMmu, fault: KvmPageFault) -> int:
    """FNAME(page_fault) for an indirect (shadow) MMU."""
    vcpu = mmu.vcpu
    kvm = mmu.kvm
    access = fault.error_code & ~PFERR_RSVD_MASK & ((1 << 32) - 1 | PFERR_IMPLICIT_ACCESS)
    w = guest_walk(mmu, fault.addr, access)
    if w.fault:
        if not fault.prefetch:
            mmu.inject_page_fault(mmu, fault.addr, w)      # the guest's #PF, or L1's EPT exit
        return RET_PF_RETRY
    fault.gfn = gpa_to_gfn(w.gpa)
    fault.slot = vcpu.gfn_to_memslot(fault.gfn)
    if not fault.rsvd and fault.present and fault.write and kvm.is_write_tracked(fault.gfn):
        _clear_flood_along(mmu, fault.addr)
        return RET_PF_EMULATE              # a write to a (write-tracked) upper-level guest table
    kvm.make_mmu_pages_available()
    fault.max_level = w.level
    r = faultin_pfn(mmu, fault, w.pte_access)
    if r != RET_PF_CONTINUE:
        return r
    pte_access = w.pte_access
    ctx = mmu.walk_ctx
    if not ctx.mode.ept and fault.write and not pte_access & ACC_WRITE_MASK and not ctx.wp and not fault.user \
            and fault.slot is not None:
        if ctx.pkeys_active and pte_access & 4:
            # A kernel-only spte for a user page would hide the page's key from the CPU: a later
            # supervisor read must still check PKRU.AD (SDM 4.6.2).  Emulate the write instead.
            return RET_PF_EMULATE
        # CR0.WP=0: a supervisor write to a read-only page is allowed; map it writable for the
        # kernel only (and not executable with SMEP), the role bits keep such pages apart.
        pte_access = (pte_access | ACC_WRITE_MASK) & ~ACC_USER_MASK
        if ctx.smep:
            pte_access &= ~ACC_EXEC_MASK
    if not mmu.root_valid:
        return RET_PF_RETRY
    ret = fetch(mmu, fault, w, pte_access, gpte_pkey(mmu, w.ptes[w.level]))
    if fault.error_code & PFERR_PK_MASK and ret != RET_PF_RETRY:
        # The CPU refused on a protection key that the guest's own rules allow: a supervisor write
        # with CR0.WP=0, which the CPU (running with CR0.WP=1) checks against PKRU.WD.  The spte is
        # right, so only the emulator can do this access.
        return RET_PF_EMULATE
    return ret


def gpte_pkey(mmu: VcpuMmu, gpte: int) -> int:
    """The protection key of a guest leaf (bits 62:59, 4- and 5-level paging), which the model copies
    into the spte for the CPU to check (docs/architecture/kvm-mmu.md; KVM has no PKU with shadow paging)."""
    return (gpte >> PT64_PKEY_SHIFT) & 15 if mmu.walk_ctx.mode.has_pkeys else 0


def _clear_flood_along(mmu: VcpuMmu, addr: int) -> None:
    for it in for_each_shadow_entry(mmu, addr):
        mmu.kvm.sptep_to_sp(it.sptep).write_flooding_count = 0


def fetch(mmu: VcpuMmu, fault: KvmPageFault, w: Walk, pte_access: int, pkey: int = 0) -> int:
    kvm = mmu.kvm
    it = ShadowWalk(mmu, fault.addr)
    if not it.okay():
        return RET_PF_RETRY             # no root, or no shadow page behind the PAE root's entry
    while it.level > w.level:
        level, sptep = it.level, it.sptep
        kvm.sptep_to_sp(sptep).write_flooding_count = 0
        child, linked = get_child_sp(mmu, sptep, w.table_gfns[level - 1], False, w.pt_access[level - 1])
        if not linked:
            if child.unsync_children:
                mmu.sync_children(child)
            kvm.link_shadow_page(sptep, child)
        it.next_okay()
    # After the indirect levels: linking them may have shadowed a gfn of the huge frame.
    kvm_mmu_hugepage_adjust(mmu, fault)
    goal = fault.goal_level
    while it.level > goal:
        level, sptep = it.level, it.sptep
        spte = kvm.read_spte(sptep)
        if spte & SPTE_MMU_PRESENT_MASK and not spte & PT_PAGE_SIZE_MASK:
            child = kvm.spte_to_child_sp(spte)
            if (child.role >> ROLE_ACCESS_SHIFT) & ACC_ALL != pte_access or role_pkey(child.role) != pkey:
                kvm.drop_parent_pte(child, sptep)     # validate_direct_spte
                kvm.flush_remote_tlbs()
        base_gfn = round_gfn_for_level(fault.gfn, level)
        child, linked = get_child_sp(mmu, sptep, base_gfn, True, pte_access, pkey)
        if not linked:
            kvm.link_shadow_page(sptep, child)
        it.next_okay()
    if it.level != goal:
        raise KvmBug(f"FNAME(fetch) for {fault.addr:#x} ended at level {it.level}, not {goal}")
    sptep = it.sptep
    base_gfn = round_gfn_for_level(fault.gfn, goal)
    ret = mmu_set_spte(mmu, fault.slot, sptep, pte_access, base_gfn, fault.pfn, fault,
                       host_writable=fault.map_writable, pkey=pkey)
    if ret == RET_PF_SPURIOUS:
        return ret
    pte_prefetch(mmu, w, sptep)
    return ret


# -- guest pte helpers ---------------------------------------------------------------------------
def _prefetch_invalid_gpte(mmu: VcpuMmu, gpte: int) -> bool:
    """Not present, not accessed (when the format has A), or with reserved bits: never mapped ahead."""
    f = mmu.gfmt
    if gpte < 0 or not f.present(gpte) or (f.accessed and not gpte & f.accessed):
        return True
    return f.rsvd_leaf(gpte)


def _first_gpte_gpa(mmu: VcpuMmu, sp: ShadowPage) -> int:
    size = mmu.gfmt.esize
    offset = ((sp.role >> ROLE_QUADRANT_SHIFT) & 3) << 9 if size == 4 else 0
    return gfn_to_gpa(sp.gfn) + offset * size


def pte_prefetch(mmu: VcpuMmu, w: Walk, sptep: int) -> None:
    """FNAME(pte_prefetch): map the accessed neighbours of a just-mapped 4 KiB gpte."""
    kvm = mmu.kvm
    sp = kvm.sptep_to_sp(sptep)
    if sp.level != 1:
        return
    if sp.direct:
        direct_pte_prefetch(mmu, sptep)
        return
    vcpu = mmu.vcpu
    size = mmu.gfmt.esize
    first = _first_gpte_gpa(mmu, sp)
    base_index = ((sptep & 0xFFF) >> 3) & ~7
    reader = vcpu.pte_reader
    vcpu.counters["memslot_lookups"] += 1     # the group is read with one atomic guest read
    for i in range(base_index, base_index + 8):
        ptr = sp.sptep(i)
        if ptr == sptep:
            continue
        spte = kvm.read_spte(ptr)
        if spte & SPTE_MMU_PRESENT_MASK:
            continue
        hva = _hva_or(vcpu, first + i * size)
        gpte = reader.mem.read(hva, size) if hva >= 0 else -1
        if _prefetch_invalid_gpte(mmu, gpte):
            if is_mmio_spte(mmu.masks, spte):
                kvm.write_spte(ptr, SHADOW_NONPRESENT_VALUE)
            break                                  # FNAME(pte_prefetch) stops at the first failure
        gfn = mmu.gfmt.gfn(gpte)
        access = ((sp.role >> ROLE_ACCESS_SHIFT) & ACC_ALL) & mmu.gfmt.access(gpte)
        if mmu.gfmt.dirty and not gpte & mmu.gfmt.dirty:
            access &= ~ACC_WRITE_MASK
        # FNAME(prefetch_gpte): kvm_prefetch_pages of one page, present and writable, never faulted in.
        slot = prefetch_slot(mmu, gfn, access)
        if slot is None:
            break
        hva = slot.gfn_to_hva(gfn)
        if not mmu.vm.host_writable(hva):
            break
        mmu_set_spte(mmu, slot, ptr, access, gfn, hva >> 12, None, pkey=gpte_pkey(mmu, gpte))


def _hva_or(vcpu: Vcpu, gpa: int) -> int:
    gfn = gpa_to_gfn(gpa)
    slot = vcpu.vm.memslots.spaces[0].search(gfn)
    if slot is None or slot.invalid:
        return -1
    return slot.gfn_to_hva(gfn) | (gpa & 0xFFF)


def sync_spte(mmu: VcpuMmu, sp: ShadowPage, i: int) -> int:
    """FNAME(sync_spte): re-read one gpte of an unsync page; <0 zap the page, 1 flush, 0 nothing."""
    kvm = mmu.kvm
    sptep = sp.sptep(i)
    spte = kvm.read_spte(sptep)
    mmio = is_mmio_spte(mmu.masks, spte)
    if not spte & SPTE_MMU_PRESENT_MASK and not mmio:
        return 0
    size = mmu.gfmt.esize
    gpte = mmu.vcpu.pte_reader.read_pte_atomic(_first_gpte_gpa(mmu, sp) + i * size, size)
    if gpte < 0:
        return -1
    if _prefetch_invalid_gpte(mmu, gpte):
        if mmio:
            kvm.write_spte(sptep, SHADOW_NONPRESENT_VALUE)
            return 0
        kvm.drop_spte(sptep)
        return 1
    gfn = mmu.gfmt.gfn(gpte)
    access = ((sp.role >> ROLE_ACCESS_SHIFT) & ACC_ALL) & mmu.gfmt.access(gpte)
    if mmu.gfmt.dirty and not gpte & mmu.gfmt.dirty:
        access &= ~ACC_WRITE_MASK
    if mmio:
        # sync_mmio_spte: a different gfn now means the cached MMIO translation is dead.
        if gfn != get_mmio_spte_gfn(mmu.masks, spte):
            kvm.write_spte(sptep, SHADOW_NONPRESENT_VALUE)
        else:
            mark_mmio_spte(mmu, sptep, gfn, access)
        return 0
    if gfn != sp.gfn_at(i):
        kvm.drop_spte(sptep)
        return 1
    translations: list[int] = sp.shadowed_translation  # type: ignore[assignment]  # an unsync page is indirect
    translations[i] = (gfn << 12) | access
    slot = mmu.vcpu.gfn_to_memslot(gfn)
    host_writable = bool(spte & mmu.masks.host_writable)
    new, _ = build_spte(mmu, sp, slot, access, gfn, (spte >> 12) & ((1 << 40) - 1), spte, False, True,
                        host_writable, gpte_pkey(mmu, gpte))
    if new == spte:
        return 0
    kvm.write_spte(sptep, new)
    return 1 if (spte & ~new) & 0x7 or (new & ~spte) & (1 << 63) or (spte ^ new) & PT64_PKEY_MASK else 0


__all__ = ["RET_PF_EMULATE", "fetch", "guest_walk", "page_fault", "paging_gva_to_gpa", "pte_prefetch", "sync_spte",
           "walker_address"]
