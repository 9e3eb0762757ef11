"""Nested VMX entry and exit: L1 runs an L2 guest whose physical memory L1 maps with its own EPT.

Entering L2 switches the vCPU to L2's registers and to the two MMU contexts of nested TDP
(kvm/mmu/nested_ept.py: guest_mmu shadows L1's EPT, nested_mmu walks for the emulator); a failed
walk of L1's EPT becomes a VM exit to L1 (nested_ept_inject_page_fault, guest_mmu's
inject_page_fault op), and leaving L2 restores L1's registers and MMU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..arch.bits import EXIT_REASON_EPT_MISCONFIG, EXIT_REASON_EPT_VIOLATION
from ..arch.walker import Walk
from ..errors import InvalidArgument
from .mmu.nested_ept import NestedMmu, ShadowEptMmu

if TYPE_CHECKING:
    from .mmu.context import VcpuMmu
    from .vcpu import Vcpu


@dataclass(frozen=True)
class NestedExit:
    """A VM exit KVM reflects to L1 (L1's EPT does not allow the access)."""

    reason: str            # "ept_violation" | "ept_misconfig"
    ngpa: int
    qualification: int

    def __repr__(self) -> str:
        return f"NestedExit({self.reason} ngpa={self.ngpa:#x} qual={self.qualification:#x})"


def enter_guest_mode(vcpu: Vcpu, eptp: int, cr0: int, cr3: int, cr4: int, efer: int) -> None:
    """L1's VMLAUNCH/VMRESUME of L2 with nested EPT rooted at `eptp`."""
    vm = vcpu.vm
    if vm.flavour != "ept":
        raise InvalidArgument("mmu", vm.flavour, "nested EPT needs a VM created with mmu='ept'")
    if vcpu.mmu_is_nested:
        raise InvalidArgument("guest mode", True, "the vCPU already runs L2; leave_guest_mode() first")
    if type(eptp) is not int or eptp < 0 or eptp >> 64:
        raise InvalidArgument("eptp", eptp, "EPTP is an unsigned 64-bit integer")
    levels = ((eptp >> 3) & 7) + 1
    if levels not in (4, 5) or eptp & 0x7 not in (0, 6):
        raise InvalidArgument("eptp", eptp, "EPTP needs a page-walk length of 4 or 5 and memory type WB (6) or UC")
    if eptp & 0xF80 or eptp >> vm.guest_maxphyaddr:
        raise InvalidArgument("eptp", eptp, f"EPTP bits 11:7 and 63:{vm.guest_maxphyaddr} (MAXPHYADDR) are reserved "
                              "(VM entry would fail)")
    # L2's registers are checked by set_sregs with the nested MMU in place; if they are refused,
    # the vCPU goes back to L1 exactly as it was (the old guest_mmu is only dropped on success).
    old = (vcpu.l1_state, vcpu.mmu)
    reuse = vcpu.guest_mmu is not None and vcpu.guest_mmu.nested_eptp == eptp
    guest_mmu = vcpu.guest_mmu if vcpu.guest_mmu is not None and reuse \
        else ShadowEptMmu(vcpu, eptp, nested_ept_inject_page_fault)
    if vcpu.nested_mmu is None:
        vcpu.nested_mmu = NestedMmu(vcpu)
    vcpu.l1_state = (vcpu.cr0, vcpu.cr3, vcpu.cr4, vcpu.efer, vcpu.mmu)
    vcpu.mmu_is_nested = True
    vcpu.mmu = guest_mmu
    vcpu.walk_mmu = vcpu.nested_mmu
    vcpu.cpu.load_vmcs(vcpu, guest_mmu)        # vmcs02: L2 runs on the shadow EPT
    try:
        vcpu.set_sregs(cr0=cr0, cr3=cr3, cr4=cr4, efer=efer)
    except BaseException:
        vcpu.l1_state, vcpu.mmu = old
        vcpu.walk_mmu = vcpu.mmu
        vcpu.cpu.load_vmcs(vcpu, vcpu.mmu)
        vcpu.mmu_is_nested = False
        raise
    if not reuse:
        if vcpu.guest_mmu is not None:
            vcpu.guest_mmu.unload()
        vcpu.guest_mmu = guest_mmu
    vcpu.stats["nested_run"] += 1
    vcpu.stats["guest_mode"] = 1
    vcpu.cpu.flush()
    vm.trace.emit("nested_vmenter", eptp=eptp, cr3=cr3)


def leave_guest_mode(vcpu: Vcpu) -> None:
    """A nested VM exit: back to L1's registers and MMU."""
    if not vcpu.mmu_is_nested:
        raise InvalidArgument("guest mode", False, "the vCPU is not running L2")
    cr0, cr3, cr4, efer, mmu = vcpu.l1_state
    vcpu.cr0, vcpu.cr3, vcpu.cr4, vcpu.efer = cr0, cr3, cr4, efer
    vcpu.mmu = vcpu.walk_mmu = mmu
    vcpu.cpu.load_vmcs(vcpu, mmu)              # vmcs01: back to L1's MMU
    vcpu.mmu_is_nested = False
    vcpu.stats["guest_mode"] = 0
    vcpu.cpu.flush()
    vcpu.vm.trace.emit("nested_vmexit")


def reflect_ept_fault(vcpu: Vcpu, ngpa: int, w: Walk) -> None:
    """Turn a failed walk of L1's EPT into a VM exit to L1."""
    reason = "ept_misconfig" if w.fault == EXIT_REASON_EPT_MISCONFIG else "ept_violation"
    vcpu.pending_nested_exit = NestedExit(reason, ngpa, w.error_code if w.fault == EXIT_REASON_EPT_VIOLATION else 0)
    vcpu.vm.trace.emit("nested_ept_fault", ngpa=ngpa, reason=reason)


def nested_ept_inject_page_fault(mmu: VcpuMmu, ngpa: int, w: Walk) -> None:
    """guest_mmu's inject_page_fault: L1's EPT refused the access, so L1 handles it."""
    reflect_ept_fault(mmu.vcpu, ngpa, w)


__all__ = ["EXIT_REASON_EPT_VIOLATION", "NestedExit", "enter_guest_mode", "leave_guest_mode",
           "nested_ept_inject_page_fault", "reflect_ept_fault"]
