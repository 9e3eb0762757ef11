"""KVM_IOEVENTFD on MMIO and VMX's fast MMIO bus (virt/kvm/eventfd.c, vmx.c handle_ept_misconfig).

An ioeventfd turns a guest write at an address into an eventfd signal, in the kernel: the VMM's
device thread wakes up, the vCPU does not exit to userspace.  Registered with length 0 it matches
a write of any size at exactly that address, and KVM puts it on two buses: KVM_MMIO_BUS (for writes
the emulator completes) and KVM_FAST_MMIO_BUS.  VMX consults the latter on an EPT misconfiguration
before anything else: a hit skips the instruction (its length comes from the VMCS) without
decoding or emulating it and without the MMU (`kvm_fast_mmio` tracepoint).  This is the doorbell
path of virtio-pci's notify region as QEMU registers it.  SVM has no such shortcut: an NPT
#NPF with RSVD goes through the MMU's fast path and the emulator.

The fast bus cannot tell a read from a write (the exit does not say), so a read of the address is
skipped too and leaves its destination register unchanged (the model returns no value).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import InvalidArgument

IOEVENTFD_LENGTHS = (0, 1, 2, 4, 8)


class IoEventFd:
    """One KVM_IOEVENTFD (MMIO): counts its signals; `on_signal(addr, length, value)` if given."""

    def __init__(self, addr: int, length: int, datamatch: int | None,
                 on_signal: Callable[[int, int, int], None] | None) -> None:
        self.addr = addr
        self.length = length
        self.datamatch = datamatch
        self.on_signal = on_signal
        self.signals = 0          # eventfd_signal calls
        self.fast_signals = 0     # ... of them from KVM_FAST_MMIO_BUS

    def in_range(self, addr: int, length: int, value: int) -> bool:
        """ioeventfd_in_range: the exact address; then any size for length 0, else the size and the
        datamatch value if one was given."""
        if addr != self.addr:
            return False
        if not self.length:
            return True
        if length != self.length:
            return False
        return self.datamatch is None or value & ((1 << (8 * length)) - 1) == self.datamatch

    def read(self, addr: int, length: int) -> int | None:
        return None               # an ioeventfd handles writes only

    def write(self, addr: int, length: int, value: int) -> bool:
        if not self.in_range(addr, length, value):
            return False
        self.signals += 1
        if length == 0:
            self.fast_signals += 1
        if self.on_signal is not None:
            self.on_signal(addr, length, value)
        return True


def check_ioeventfd(addr: object, length: object, datamatch: object, on_signal: object) -> None:
    """kvm_assign_ioeventfd's checks, made before anything is registered."""
    if type(addr) is not int or addr < 0 or addr >> 64:
        raise InvalidArgument("ioeventfd addr", addr, "an MMIO address is an unsigned 64-bit integer")
    if length not in IOEVENTFD_LENGTHS or type(length) is not int:
        raise InvalidArgument("ioeventfd length", length, f"KVM_IOEVENTFD takes a length of {IOEVENTFD_LENGTHS}")
    if addr + length > 1 << 64:
        raise InvalidArgument("ioeventfd addr", addr, "the range wraps past the end of the address space")
    if datamatch is not None:
        if not length:
            raise InvalidArgument("ioeventfd datamatch", datamatch,
                                  "KVM_IOEVENTFD_FLAG_DATAMATCH needs a length (length 0 matches any write)")
        if type(datamatch) is not int or datamatch < 0 or datamatch >> (8 * length):
            raise InvalidArgument("ioeventfd datamatch", datamatch, f"datamatch is an unsigned {8 * length}-bit value")
    if on_signal is not None and not callable(on_signal):
        raise InvalidArgument("ioeventfd on_signal", on_signal, "on_signal is a callable (addr, length, value) or None")
