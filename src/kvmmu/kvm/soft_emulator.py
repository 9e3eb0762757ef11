"""The memory side of KVM's x86 emulator over the model's vCPU, for the software CPU's host profiles
(`kvmmu.kvm.profiles`): emulator_read_write one page at a time, kvm_fetch_guest_virt, and the
kvm_{read,write}_guest_virt_system accesses of KVM's own event delivery; KVM_EXIT_MMIO records in
<= 8-byte pieces, in-kernel devices through the io bus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..arch.bits import (
    PF_VECTOR,
    PFERR_FETCH_MASK,
    PFERR_IMPLICIT_ACCESS,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    X86_CR4_LA57,
)
from ..hw.x86cpu import GP, CpuFault, Stop
from .emulate import cached_mmio_gpa, exit_to_vmm, perform_piece, pieces, ram_access, vcpu_is_mmio_gpa
from .mmu.paging import guest_walk

if TYPE_CHECKING:
    from .vcpu import Vcpu


class Emulator:
    """The memory side of KVM's x86 emulator (emulator_read_write, kvm_fetch_guest_virt, the
    kvm_{read,write}_guest_virt_system accesses of event delivery) over the model's vCPU."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.vm = vcpu.vm
        self.inject = True         # a failed walk injects #PF (pf_guest); not while delivering an event

    def translate(self, gva: int, write: bool, fetch: bool, cpl: int, implicit: bool) -> tuple[int, bool]:
        """vcpu_mmio_gva_to_gpa / kvm_mmu_gva_to_gpa_*: (gpa, is_mmio); a #PF is injected on failure."""
        vcpu = self.vcpu
        access = (PFERR_WRITE_MASK if write else 0) | (PFERR_FETCH_MASK if fetch else 0)
        if cpl == 3 and not implicit:
            access |= PFERR_USER_MASK
        if implicit:
            access |= PFERR_IMPLICIT_ACCESS
        gpa = cached_mmio_gpa(vcpu, gva, access)
        if gpa is not None:
            return gpa, True
        w = guest_walk(vcpu.mmu, _walker_address(vcpu, gva), access)
        if w.fault:
            if self.inject:
                vcpu.inject_page_fault(w.error_code, gva)
                vcpu.take_exception()
            raise CpuFault(PF_VECTOR, w.error_code & 0xFFFF, gva)
        return w.gpa, vcpu_is_mmio_gpa(vcpu, w.gpa)

    def _translated(self, gva: int, size: int, write: bool, cpl: int,
                    implicit: bool) -> Iterable[tuple[tuple[int, int, int], tuple[int, bool]]]:
        """The pieces of an access with their (gpa, is_mmio).  KVM's emulator_read_write translates each
        page just before using it (kvm_deviations); the SDM has no effect before every page translates."""
        parts = pieces(gva, size)
        if self.vm.kvm_deviations:
            return ((p, self.translate(p[0], write, False, cpl, implicit)) for p in parts)
        return [(p, self.translate(p[0], write, False, cpl, implicit)) for p in parts]

    def read(self, gva: int, size: int, cpl: int, implicit: bool = False,
             on_exit: Callable[[], None] | None = None) -> int:
        out = bytearray(size)
        frags: list[tuple[int, int, int]] = []
        for (_pgva, off, n), t in self._translated(gva, size, False, cpl, implicit):
            perform_piece(self.vcpu, t, off, n, False, b"", out, frags)
        if frags:
            exit_to_vmm(self.vcpu, frags, False, b"", out, on_exit)
        return int.from_bytes(out, "little")

    def write(self, gva: int, size: int, value: int, cpl: int, implicit: bool = False, tracked: bool = True,
              on_exit: Callable[[], None] | None = None, ram_only: bool = False) -> bool:
        """Returns True when (part of) the write left as KVM_EXIT_MMIO.  ``ram_only``: KVM's own
        event delivery (kvm_write_guest_virt_system) writes guest RAM only; a frame that lands
        on MMIO makes the delivery fail (a fault while delivering: measured, the escalation ends
        in KVM_EXIT_SHUTDOWN with no KVM_EXIT_MMIO)."""
        data = value.to_bytes(size, "little")
        frags: list[tuple[int, int, int]] = []
        for (_pgva, off, n), t in self._translated(gva, size, True, cpl, implicit):
            if not perform_piece(self.vcpu, t, off, n, True, data, None, frags, tracked, ram_only):
                raise CpuFault(GP, 0)
        if frags:
            exit_to_vmm(self.vcpu, frags, True, data, None, on_exit)
            return True
        return False

    def fetch(self, gva: int, n: int, cpl: int) -> bytes:
        """kvm_fetch_guest_virt: instruction bytes from RAM; from MMIO KVM cannot emulate."""
        gpa, mmio = self.translate(gva, False, True, cpl, False)
        out = bytearray(n)
        if mmio or not ram_access(self.vcpu, gpa, n, False, b"", out, 0):
            self.vcpu.stats["insn_emulation_fail"] += 1
            raise Stop("internal_error", f"instruction fetch from MMIO at gva {gva:#x} (gpa {gpa:#x})")
        return bytes(out)


def _walker_address(vcpu: Vcpu, gva: int) -> int:
    """KVM's walker indexes the guest tables with bits 47:0 (56:0 with LA57) and never looks above
    them; the arch walker wants the canonical address with the same indices.  Only the second page
    of an access straddling the canonical boundary gets here non-canonical (noncanonical_tail)."""
    bits = 57 if vcpu.cr4 & X86_CR4_LA57 else 48
    low = gva & ((1 << bits) - 1)
    return low | (((1 << 64) - 1) ^ ((1 << bits) - 1)) if low >> (bits - 1) else low


__all__ = ["Emulator"]
