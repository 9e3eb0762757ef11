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
)
from ..hw.x86cpu import GP, UD, CpuFault, Stop
from .emulate import emulation_failure, exit_to_vmm, fetch_fails, gva_to_gpa, perform_piece, pieces

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
        """kvm_mmu_gva_to_gpa_* for one page (emulate.gva_to_gpa): (gpa, is_mmio); a failed walk is
        raised as the CPU's #PF, queued by KVM first unless KVM is delivering an event itself."""
        access = (PFERR_WRITE_MASK if write else 0) | (PFERR_FETCH_MASK if fetch else 0)
        if implicit:
            access |= PFERR_IMPLICIT_ACCESS
        elif cpl == 3:
            access |= PFERR_USER_MASK
        t = gva_to_gpa(self.vcpu, gva, access, inject=self.inject)
        if isinstance(t, int):
            if self.inject:
                self.vcpu.take_exception()
            raise CpuFault(PF_VECTOR, t & 0xFFFF, gva)
        return t

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
        """kvm_fetch_guest_virt: every page translated, then the bytes read; a fetch from MMIO fails
        the emulation as in emulate_access (emulate.fetch_fails / emulation_failure): the CPU's #UD,
        or Stop("internal_error") when KVM exits with KVM_INTERNAL_ERROR_EMULATION."""
        vcpu = self.vcpu
        parts = pieces(gva, n)
        translated = [self.translate(p[0], False, True, cpl, False) for p in parts]
        if fetch_fails(vcpu, translated):
            _ud, internal = emulation_failure(vcpu, cpl)
            if internal is not None:
                raise Stop("internal_error", f"instruction fetch from MMIO at gva {gva:#x} ({internal})")
            raise CpuFault(UD)
        out = bytearray(n)
        frags: list[tuple[int, int, int]] = []
        for (_pgva, off, k), t in zip(parts, translated, strict=True):
            perform_piece(vcpu, t, off, k, False, b"", out, frags)
        if frags:
            exit_to_vmm(vcpu, frags, False, b"", out)
        return bytes(out)


__all__ = ["Emulator"]
