"""MMIO page-fault support: the no-slot decision and the fast path (the per-vCPU cache they fill
is `mmio_cache.MmioCache`).

`handle_mmio_page_fault` runs on a fault with PFERR_RSVD (EPT: a misconfiguration).  It never
takes the MMU lock, allocates no shadow page, walks no guest table and searches no memslot: it
checks the vCPU's cache, then walks KVM's own tables locklessly and validates the generation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...arch.bits import PT_PAGE_SIZE_MASK
from ...errors import KvmBug
from ..memslots import KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
from .pf import RET_PF_CONTINUE, RET_PF_EMULATE, RET_PF_INVALID, RET_PF_RETRY, KvmPageFault
from .shadow_iter import for_each_shadow_entry_lockless
from .spte import (
    SPTE_MMU_PRESENT_MASK,
    get_mmio_spte_access,
    get_mmio_spte_generation,
    get_mmio_spte_gfn,
    is_mmio_spte,
)

if TYPE_CHECKING:
    from ..vcpu import Vcpu
    from .spte import MmioGenLayout


# -- the slow path's no-slot decision (kvm_handle_noslot_fault) -----------------------------------
def handle_noslot_fault(vcpu: Vcpu, fault: KvmPageFault, access: int) -> int:
    masks = vcpu.mmu.masks
    vcpu.mmio_cache.cache(0 if fault.is_tdp else fault.addr, fault.gfn, access & masks.mmio_access_mask)
    if not masks.mmio_enabled:
        return RET_PF_EMULATE
    if fault.gfn > masks.mmio_max_gfn:
        # The gfn would not survive get_mmio_spte_gfn: emulate without caching, as KVM does for a
        # gfn above kvm_mmu_max_gfn (whose TDP value is the same host-MAXPHYADDR limit).
        return RET_PF_EMULATE
    if fault.is_tdp and fault.gfn >> (9 * vcpu.mmu.root_level):
        # Past what the TDP root translates (4-level EPT: 48 bits).  KVM never meets this, as it caps
        # the guest's MAXPHYADDR at the TDP reach; an MMIO spte here would land on gfn mod the reach.
        return RET_PF_EMULATE
    return RET_PF_CONTINUE


def check_mmio_spte(vcpu: Vcpu, spte: int) -> bool:
    vm = vcpu.vm
    if vm.mmio_caching == "zap":
        return True
    gen = vm.memslots.generation(vcpu.as_id)
    if gen & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
        ok = False
    else:
        masks = vcpu.mmu.masks
        layout: MmioGenLayout = masks.gen  # type: ignore[assignment]  # None only with mmio_caching="zap"
        ok = (gen & layout.mask) == get_mmio_spte_generation(masks, spte)
    if vm.trace.enabled:
        # kvm_gen is the generation as the spte field holds it (check_mmio_spte compares the two).
        mask = vcpu.mmu.masks.gen.mask if vcpu.mmu.masks.gen else 0
        vm.trace.emit("check_mmio_spte", spte=spte, kvm_gen=gen & mask,
                      spte_gen=get_mmio_spte_generation(vcpu.mmu.masks, spte))
    return ok


def handle_mmio_page_fault(vcpu: Vcpu, addr: int, direct: bool) -> int:
    c = vcpu.counters
    if vcpu.mmio_cache.info_in_cache(addr, direct):
        c["mmio_cache_hits"] += 1
        return RET_PF_EMULATE
    reserved, spte = get_mmio_spte(vcpu, addr)
    if reserved:
        raise KvmBug(f"reserved bits set in a non-MMIO spte {spte:#x} on the walk for {addr:#x}")
    masks = vcpu.mmu.masks
    if is_mmio_spte(masks, spte):
        gfn = get_mmio_spte_gfn(masks, spte)
        access = get_mmio_spte_access(masks, spte)
        if not check_mmio_spte(vcpu, spte):
            c["mmio_fastpath_invalid"] += 1
            return RET_PF_INVALID
        if direct:
            addr = 0
        trace = vcpu.vm.trace
        if trace.enabled:
            trace.emit("handle_mmio_page_fault", addr=addr, gfn=gfn, access=access)
        vcpu.mmio_cache.cache(addr, gfn, access)
        c["mmio_fastpath"] += 1
        return RET_PF_EMULATE
    return RET_PF_RETRY


def get_mmio_spte(vcpu: Vcpu, addr: int) -> tuple[bool, int]:
    """Lockless walk of the current root; check every present spte against KVM's reserved bits."""
    mmu = vcpu.mmu
    kvm = mmu.kvm
    c = vcpu.counters
    c["shadow_walks"] += 1
    walked: list[tuple[int, int]] = []
    sp = mmu.root_sp
    tdp_mmu = kvm.tdp_mmu
    if sp is not None and sp.tdp and tdp_mmu is not None:
        walked = tdp_mmu.get_walk(mmu, addr)        # kvm_tdp_mmu_get_walk
        c["shadow_walk_steps"] += len(walked)
    else:
        for it, spte in for_each_shadow_entry_lockless(mmu, addr):
            walked.append((it.level, spte))
        c["shadow_walk_steps"] += len(walked)
    if not walked:
        return False, 0
    rsvd0, rsvd1 = mmu.shadow_zero_check.rsvd
    bad_mt = mmu.shadow_zero_check.bad_mt_xwr
    for level, spte in walked:
        if not spte & SPTE_MMU_PRESENT_MASK:
            continue
        if spte & (rsvd1 if spte & PT_PAGE_SIZE_MASK else rsvd0)[level] or (bad_mt >> (spte & 0x3F)) & 1:
            return True, spte
    del kvm
    return False, walked[-1][1]
