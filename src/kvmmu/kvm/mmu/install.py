"""Turning a resolved fault into sptes: kvm_faultin_pfn, make_spte's write-protection rules,
mmu_set_spte, child-page linking and prefetch.  Shared by the shadow and the direct fault paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...arch.bits import ACC_ALL, ACC_WRITE_MASK, PT64_PKEY_MASK, PT_WRITABLE_MASK
from ..memslots import KVM_MEM_LOG_DIRTY_PAGES, Memslot
from .mmio import handle_noslot_fault
from .page import ShadowPage, child_role, role_access, role_pkey, role_smm
from .pf import (
    KVM_PFN_ERR_RO_FAULT,
    KVM_PFN_NOSLOT,
    RET_PF_CONTINUE,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    KvmPageFault,
)
from .spte import (
    SPTE_MMU_PRESENT_MASK,
    get_mmio_spte_generation,
    is_large_pte,
    make_mmio_spte,
    make_spte,
    spte_to_pfn,
)

if TYPE_CHECKING:
    from .context import VcpuMmu


def faultin_pfn(mmu: VcpuMmu, fault: KvmPageFault, access: int) -> int:
    """kvm_faultin_pfn: from gfn to host frame, or the reason there is none."""
    slot = fault.slot
    if slot is not None and slot.invalid:
        return RET_PF_RETRY           # the slot is being deleted or moved
    if slot is None:
        fault.pfn = KVM_PFN_NOSLOT
        return handle_noslot_fault(mmu.vcpu, fault, access)
    if fault.write and slot.readonly:
        fault.pfn = KVM_PFN_ERR_RO_FAULT
        return RET_PF_EMULATE         # ROM write: emulate, and cache nothing as MMIO
    hva = slot.gfn_to_hva(fault.gfn)
    if mmu.vm.host_touch(hva, write=fault.write):
        # get_user_pages copied the host's zero page for this write: the MMU notifier ran meanwhile,
        # so the fault is stale (is_page_fault_stale) and the guest retries it.
        return RET_PF_RETRY
    fault.hva = hva
    fault.pfn = hva >> 12
    # hva_to_pfn maps a read fault writable only if the host page already is (not the zero page).
    fault.map_writable = not slot.readonly and mmu.vm.host_writable(hva)
    return RET_PF_CONTINUE


def build_spte(mmu: VcpuMmu, sp: ShadowPage, slot: Memslot | None, pte_access: int, gfn: int, pfn: int,
               old_spte: int, prefetch: bool, synchronizing: bool, host_writable: bool,
               pkey: int = 0) -> tuple[int, bool]:
    """make_spte with the unsync decision; returns (spte, write-protected-instead-of-writable)."""
    kvm = mmu.kvm
    wrprot = False
    if not host_writable:
        pte_access &= ~2
    if pte_access & ACC_WRITE_MASK and not (old_spte & SPTE_MMU_PRESENT_MASK and old_spte & PT_WRITABLE_MASK) and \
            not kvm.try_to_unsync_pages(gfn, synchronizing, prefetch):
        wrprot = True
        pte_access &= ~2
    # When write-protected, host-writable stays and W/MMU-writable are clear (1/0/0): only the
    # full path may make it writable again, by unsyncing the shadowed page table.
    spte = make_spte(mmu.masks, sp.level, pte_access, pfn, host_writable, prefetch, pkey)
    if spte & PT_WRITABLE_MASK and slot is not None and slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
        mmu.vm.mark_page_dirty(slot, gfn)
    return spte, wrprot


def new_mmio_spte(mmu: VcpuMmu, gfn: int, access: int) -> int:
    """make_mmio_spte with the vCPU's current memslot generation."""
    return make_mmio_spte(mmu.masks, gfn, access, mmu.vm.memslots.generation(mmu.vcpu.as_id))


def trace_mark_mmio_spte(mmu: VcpuMmu, sptep: int, gfn: int, spte: int) -> None:
    """The mark_mmio_spte tracepoint: KVM records `spte & ACC_ALL` as the access, so on shadow/NPT the
    present bit of the MMIO value shows (7 or 5 where the cached access is 6 or 4)."""
    trace = mmu.vm.trace
    if trace.enabled:
        trace.emit("mark_mmio_spte", sptep=sptep, gfn=gfn, access=spte & ACC_ALL,
                   gen=get_mmio_spte_generation(mmu.masks, spte))


def mark_mmio_spte(mmu: VcpuMmu, sptep: int, gfn: int, access: int) -> None:
    spte = new_mmio_spte(mmu, gfn, access)
    mmu.kvm.write_spte(sptep, spte)
    trace_mark_mmio_spte(mmu, sptep, gfn, spte)


def mmu_set_spte(mmu: VcpuMmu, slot: Memslot | None, sptep: int, pte_access: int, gfn: int, pfn: int,
                 fault: KvmPageFault | None, host_writable: bool = True, pkey: int = 0) -> int:
    kvm = mmu.kvm
    vcpu = mmu.vcpu
    sp = kvm.sptep_to_sp(sptep)
    index = (sptep & 0xFFF) >> 3
    old = kvm.read_spte(sptep)
    flush = False
    was_rmapped = False
    if old & SPTE_MMU_PRESENT_MASK:
        if sp.level > 1 and not is_large_pte(old):
            kvm.drop_parent_pte(kvm.spte_to_child_sp(old), sptep)
            sp.unsync_children.discard(index)
            flush = True
        elif spte_to_pfn(old) != pfn:
            kvm.drop_spte(sptep)
            flush = True
        else:
            was_rmapped = True
    if pfn == KVM_PFN_NOSLOT:
        # The old mapping (if any) is gone first: an MMIO spte must never replace a present one.
        if was_rmapped:
            kvm.drop_spte(sptep)
            flush = True
        vcpu.stats["pf_mmio_spte_created"] += 1
        mark_mmio_spte(mmu, sptep, gfn, pte_access)
        if flush:
            kvm.flush_remote_tlbs()
        return RET_PF_EMULATE
    prefetch = fault is None
    new, wrprot = build_spte(mmu, sp, slot, pte_access, gfn, pfn, old if was_rmapped else 0, prefetch, False,
                             host_writable, pkey)
    ret = RET_PF_FIXED
    if was_rmapped and new == old:
        ret = RET_PF_SPURIOUS
    else:
        kvm.write_spte(sptep, new)
        if was_rmapped and ((old & ~new) & 0x7 or (old ^ new) & PT64_PKEY_MASK):
            flush = True                # fewer rights, or another protection key
        vcpu.counters["spte_installs"] += 1
        if mmu.vm.trace.enabled:
            mmu.vm.trace.emit("kvm_mmu_set_spte", level=sp.level, gfn=gfn, spte=new, sptep=sptep, ept=mmu.masks.ept)
    if wrprot and fault is not None and fault.write:
        ret = RET_PF_EMULATE
    if sp.shadowed_translation is not None:
        sp.shadowed_translation[index] = (gfn << 12) | pte_access
    if not was_rmapped:
        kvm.rmap_add(role_smm(sp.role), gfn, sptep, sp.level)
    if flush:
        kvm.flush_remote_tlbs()
    return ret


def get_child_sp(mmu: VcpuMmu, sptep: int, gfn: int, direct: bool, access: int,
                 pkey: int = 0) -> tuple[ShadowPage, bool]:
    """kvm_mmu_get_child_sp: (child, already linked); `pkey` is ROLE_MODEL_PKEY (direct pages)."""
    kvm = mmu.kvm
    spte = kvm.read_spte(sptep)
    if spte & SPTE_MMU_PRESENT_MASK:
        if not is_large_pte(spte):
            return kvm.spte_to_child_sp(spte), True
        kvm.drop_spte(sptep)            # a huge leaf is replaced by a table
        kvm.flush_remote_tlbs()
    parent = kvm.sptep_to_sp(sptep)
    role = child_role(parent.role, (sptep & 0xFFF) >> 3, direct, access, pkey)
    return mmu.get_shadow_page(gfn, role), False


def prefetch_slot(mmu: VcpuMmu, gfn: int, access: int) -> Memslot | None:
    """The memslot KVM may prefetch gfn from: gfn_to_memslot_dirty_bitmap (no writable prefetch into
    a dirty-logged slot), and not a read-only slot (the prefetch asks for a writable host address,
    which __gfn_to_hva_many refuses there)."""
    slot = mmu.vcpu.gfn_to_memslot(gfn)
    if slot is None or slot.invalid or slot.readonly or \
            (slot.flags & KVM_MEM_LOG_DIRTY_PAGES and access & ACC_WRITE_MASK):
        return None
    return slot


def direct_pte_prefetch(mmu: VcpuMmu, sptep: int) -> None:
    """__direct_pte_prefetch: map the unmapped neighbours of a direct 4 KiB spte, in runs of
    unmapped sptes within its aligned group of eight; the first run that cannot be prefetched ends
    it all."""
    kvm = mmu.kvm
    sp = kvm.sptep_to_sp(sptep)
    if sp.level != 1:
        return
    base = sptep & ~0x3F
    start = None
    for ptr in range(base, base + 64, 8):
        if ptr == sptep or kvm.read_spte(ptr) & SPTE_MMU_PRESENT_MASK:
            if start is None:
                continue
            if not _direct_pte_prefetch_many(mmu, sp, start, ptr):
                return
            start = None
        elif start is None:
            start = ptr
    if start is not None:
        _direct_pte_prefetch_many(mmu, sp, start, base + 64)


def _direct_pte_prefetch_many(mmu: VcpuMmu, sp: ShadowPage, start: int, end: int) -> bool:
    """direct_pte_prefetch_many: kvm_prefetch_pages takes the host pages of [start, end) without
    sleeping (get_user_pages_fast_only with FOLL_WRITE), which stops at the first page that is not
    present and writable; none at all, or a run past the slot's end, fails the prefetch."""
    access = role_access(sp.role)
    pkey = role_pkey(sp.role)
    gfn = sp.gfn_at((start & 0xFFF) >> 3)
    slot = prefetch_slot(mmu, gfn, access)
    n = (end - start) >> 3
    if slot is None or gfn + n > slot.end_gfn:
        return False
    vm = mmu.vm
    got = 0
    while got < n and vm.host_writable(slot.gfn_to_hva(gfn + got)):
        got += 1
    if not got:
        return False
    for i in range(got):
        mmu_set_spte(mmu, slot, start + 8 * i, access, gfn + i, slot.gfn_to_hva(gfn + i) >> 12, None, pkey=pkey)
    return True
