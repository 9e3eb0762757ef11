"""Nested TDP: L1 runs an L2 guest whose physical memory L1 maps with its own EPT tables.

KVM shadows L1's EPT (guest_mmu: indirect shadow pages with role.guest_mode, faults arrive with an
L2 physical address), and its emulator translates L2 addresses with nested_mmu: L2's page tables,
each table access and the final address translated through L1's EPT.  The per-vCPU MMIO cache is
never consulted while L2 runs (the thread of the 2011 seed: a cached L1 gva/gfn says nothing about an
L2 address).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..arch.bits import (
    EXIT_REASON_EPT_MISCONFIG,
    EXIT_REASON_EPT_VIOLATION,
    PFERR_FETCH_MASK,
    PFERR_WRITE_MASK,
    PT64_ADDR_MASK,
)
from ..arch.modes import PagingContext
from ..arch.walker import Walk, walk
from ..errors import InvalidArgument
from .mmu.context import VcpuMmu

if TYPE_CHECKING:
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
    guest_mmu = vcpu.guest_mmu if reuse else VcpuMmu(vcpu, nested_eptp=eptp)
    vcpu.l1_state = (vcpu.cr0, vcpu.cr3, vcpu.cr4, vcpu.efer, vcpu.mmu)
    vcpu.mmu_is_nested = True
    vcpu.mmu = guest_mmu  # type: ignore[assignment]
    vcpu.cpu.load_vmcs(vcpu, guest_mmu)        # vmcs02: L2 runs on the shadow EPT
    try:
        vcpu.set_sregs(cr0=cr0, cr3=cr3, cr4=cr4, efer=efer)
    except BaseException:
        vcpu.l1_state, vcpu.mmu = old
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
    vcpu.mmu = mmu
    vcpu.cpu.load_vmcs(vcpu, mmu)              # vmcs01: back to L1's MMU
    vcpu.mmu_is_nested = False
    vcpu.stats["guest_mode"] = 0
    vcpu.cpu.flush()
    vcpu.vm.trace.emit("nested_vmexit")


def reflect_ept_fault(vcpu: Vcpu, ngpa: int, w: Walk) -> None:
    """nested_ept_inject_page_fault: turn a failed walk of L1's EPT into a VM exit to L1."""
    reason = "ept_misconfig" if w.fault == EXIT_REASON_EPT_MISCONFIG else "ept_violation"
    vcpu.pending_nested_exit = NestedExit(reason, ngpa, w.error_code if w.fault == EXIT_REASON_EPT_VIOLATION else 0)
    vcpu.vm.trace.emit("nested_ept_fault", ngpa=ngpa, reason=reason)


def _l1_ept_walk(vcpu: Vcpu, ngpa: int, access: int) -> Walk:
    mmu = vcpu.guest_mmu
    vcpu.counters["guest_walks"] += 1
    return walk(mmu.walk_ctx, vcpu.pte_reader, mmu.nested_eptp, ngpa, access & (PFERR_WRITE_MASK | PFERR_FETCH_MASK))


class _L2TableReader:
    """L2's page tables as KVM's nested_mmu reads them: each table address through L1's EPT."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.failed: tuple[int, Walk] | None = None

    def read_pte(self, ngpa: int, size: int) -> int:
        w = _l1_ept_walk(self.vcpu, ngpa, 0)
        if w.fault:
            self.failed = (ngpa, w)
            return -1
        return self.vcpu.pte_reader.read_pte(w.gpa, size)

    def cmpxchg_pte(self, ngpa: int, size: int, old: int, new: int) -> bool:
        w = _l1_ept_walk(self.vcpu, ngpa, PFERR_WRITE_MASK)
        if w.fault:
            self.failed = (ngpa, w)
            return True
        return self.vcpu.pte_reader.cmpxchg_pte(w.gpa, size, old, new)


def nested_gva_to_gpa(vcpu: Vcpu, gva: int, access: int) -> int | None:
    """The emulator's L2 gva -> L1 gpa; None when a fault went to L2 (#PF) or to L1 (EPT exit)."""
    ctx: PagingContext = vcpu.mmu.cpu_role
    reader = _L2TableReader(vcpu)
    if ctx.mode.root_level:
        vcpu.counters["guest_walks"] += 1
        w = walk(ctx, reader, vcpu.cr3, gva, access, ac=vcpu.ac, pkru=vcpu.pkru)
        if reader.failed is not None:
            reflect_ept_fault(vcpu, *reader.failed)
            return None
        if w.fault:
            vcpu.inject_page_fault(w.error_code, gva)
            return None
        ngpa = w.gpa
    else:
        ngpa = gva
    w2 = _l1_ept_walk(vcpu, ngpa, access)
    if w2.fault:
        reflect_ept_fault(vcpu, ngpa, w2)
        return None
    return w2.gpa & PT64_ADDR_MASK | (ngpa & 0xFFF)


__all__ = ["EXIT_REASON_EPT_VIOLATION", "NestedExit", "enter_guest_mode", "leave_guest_mode",
           "nested_gva_to_gpa", "reflect_ept_fault"]
