"""VM exits as KVM's `kvm_exit` tracepoint reports them, by the ISA the MMU flavour runs on.

The model's flavours map onto hardware as KVM runs them: EPT and shadow paging on VMX, NPT on SVM.
A fault the CPU raises on KVM's tables is an EPT violation / EPT misconfiguration (VMX, EPT), a #NPF
(SVM), or an intercepted #PF (shadow paging: VMX EXCEPTION_NMI with vector 14).  `kvm_page_fault`
follows only the exits whose handlers trace it (handle_ept_violation, npf_interception,
kvm_handle_page_fault); handle_ept_misconfig does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch.bits import (
    PFERR_FETCH_MASK,
    PFERR_GUEST_FINAL_MASK,
    PFERR_GUEST_PAGE_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_WRITE_MASK,
)
from .tracepoints import KVM_ISA_SVM, KVM_ISA_VMX

if TYPE_CHECKING:
    from .vcpu import Vcpu

# VMX basic exit reasons (SDM Vol. 3 Appendix C) and the SVM exit codes (APM Vol. 2 Appendix C).
EXIT_EXCEPTION_NMI, EXIT_HLT, EXIT_INVLPG, EXIT_CR_ACCESS = 0, 12, 14, 28
EXIT_EPT_VIOLATION, EXIT_EPT_MISCONFIG = 48, 49
_SVM_CODE = {EXIT_HLT: 0x078, EXIT_INVLPG: 0x079, EXIT_CR_ACCESS: 0x013, EXIT_EXCEPTION_NMI: 0x04E}
SVM_EXIT_NPF = 0x400
# VM-exit interruption information for a #PF: valid, error code valid, hardware exception, vector 14.
_PF_INTR_INFO = 0x8000_0B0E


def isa(vcpu: Vcpu) -> int:
    return KVM_ISA_SVM if vcpu.vm.flavour == "npt" else KVM_ISA_VMX


def trace_exit(vcpu: Vcpu, reason: int, info1: int = 0, info2: int = 0, intr_info: int = 0,
               error_code: int = 0) -> None:
    """kvm_exit for an exit given by its VMX reason (translated for SVM)."""
    i = isa(vcpu)
    code = _SVM_CODE.get(reason, reason) if i == KVM_ISA_SVM else reason
    vcpu.vm.trace.emit("kvm_exit", vcpu_id=vcpu.id, exit_reason=code, isa=i, rip=vcpu.rip, info1=info1,
                       info2=info2, intr_info=intr_info, error_code=error_code)


def trace_page_fault_exit(vcpu: Vcpu, addr: int, err: int) -> None:
    """kvm_exit (+ kvm_page_fault) for a fault on KVM's tables at `addr` with PFERR bits `err`."""
    trace = vcpu.vm.trace
    if vcpu.pf_exiting:
        # An intercepted #PF: the qualification is CR2, the interruption info carries the error code.
        trace_exit(vcpu, EXIT_EXCEPTION_NMI, info1=addr, intr_info=_PF_INTR_INFO, error_code=err & 0xFFFF_FFFF)
        trace.emit("kvm_page_fault", fault_address=addr, error_code=err & 0xFFFF_FFFF)
        return
    if isa(vcpu) == KVM_ISA_SVM:
        # #NPF: EXITINFO1 is the error code (with the final/page-walk bits 32/33), EXITINFO2 the gpa.
        vcpu.vm.trace.emit("kvm_exit", vcpu_id=vcpu.id, exit_reason=SVM_EXIT_NPF, isa=KVM_ISA_SVM, rip=vcpu.rip,
                           info1=err, info2=addr, intr_info=0, error_code=0)
        trace.emit("kvm_page_fault", fault_address=addr, error_code=err & 0xFFFF_FFFF)
        return
    if err & PFERR_RSVD_MASK:
        trace_exit(vcpu, EXIT_EPT_MISCONFIG)
        return
    # The EPT-violation qualification: the access (bits 0-2), whether the entry was present (bit 3
    # stands for its read right: the model's exit carries no more), the linear-address bits 7-8.
    qual = 2 if err & PFERR_WRITE_MASK else 4 if err & PFERR_FETCH_MASK else 1
    if err & PFERR_PRESENT_MASK:
        qual |= 8
    if err & (PFERR_GUEST_FINAL_MASK | PFERR_GUEST_PAGE_MASK):
        qual |= 0x80 | (0x100 if err & PFERR_GUEST_FINAL_MASK else 0)
    trace_exit(vcpu, EXIT_EPT_VIOLATION, info1=qual)
    trace.emit("kvm_page_fault", fault_address=addr, error_code=err & 0xFFFF_FFFF)
