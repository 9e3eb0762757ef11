"""kvm_mmu_page_fault: the entry point for every MMU exit (#PF under shadow paging, EPT violation or
misconfiguration, #NPF), with the MMIO fast path in front of the full handler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...arch.bits import PFERR_RSVD_MASK
from .direct import kvm_tdp_page_fault
from .mmio import handle_mmio_page_fault
from .pf import (
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_INVALID,
    RET_PF_NAMES,
    RET_PF_SPURIOUS,
    RET_PF_WRITE_PROTECTED,
    KvmPageFault,
)

if TYPE_CHECKING:
    from ..vcpu import Vcpu


def kvm_mmu_do_page_fault(vcpu: Vcpu, addr: int, error_code: int) -> int:
    mmu = vcpu.mmu
    op = mmu.page_fault
    r = op(mmu, KvmPageFault(addr, error_code, is_tdp=op is kvm_tdp_page_fault))
    if r == RET_PF_WRITE_PROTECTED:
        r = RET_PF_EMULATE
    stats = vcpu.stats
    if r == RET_PF_FIXED:
        stats["pf_fixed"] += 1
    elif r == RET_PF_EMULATE:
        stats["pf_emulate"] += 1
    elif r == RET_PF_SPURIOUS:
        stats["pf_spurious"] += 1
    return r


def kvm_mmu_page_fault(vcpu: Vcpu, addr: int, error_code: int) -> int:
    """Returns RET_PF_EMULATE when the access must be emulated, anything else means 'resume'."""
    vm = vcpu.vm
    direct = vcpu.mmu.direct
    r = RET_PF_INVALID
    vcpu.allow_retry_pf = False
    if error_code & PFERR_RSVD_MASK:
        r = handle_mmio_page_fault(vcpu, addr, direct)
        if r == RET_PF_EMULATE:
            return r                 # the fast path: no pf_* statistic moves
    if r == RET_PF_INVALID:
        vcpu.stats["pf_taken"] += 1
        r = kvm_mmu_do_page_fault(vcpu, addr, error_code)
        if r == RET_PF_INVALID:
            raise AssertionError("the full fault path must not return RET_PF_INVALID")
    if r == RET_PF_EMULATE:
        # EMULTYPE_ALLOW_RETRY_PF: never for MMIO the vCPU has cached, nor for a nested guest
        # (kvm_mmu_page_fault's is_guest_mode test, a fact of the vCPU).
        vcpu.allow_retry_pf = not vcpu.mmio_cache.info_in_cache(addr, direct) and not vcpu.mmu_is_nested
    if vm.trace.enabled:                 # (emit would return at once, after its arguments were built)
        vm.trace.emit("page_fault_done", addr=addr, ret=RET_PF_NAMES[r])
    return r
