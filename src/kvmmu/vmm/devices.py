"""Device models of the userspace VMM (QEMU's role) and of KVM's in-kernel devices.

Every device is a register file on an MMIO range.  Where it runs decides what an access costs:

- **in-kernel** (`in_kernel=True`): registered on KVM's MMIO bus (`vm.register_io_device`); KVM
  completes the access without leaving the kernel (KVM's LAPIC and IOAPIC with `kernel_irqchip=on`,
  an ioeventfd on a virtio doorbell).
- **userspace**: not on the bus, so KVM exits with KVM_EXIT_MMIO and the VMM's handler
  (`Machine.handle_mmio`) dispatches to the device (QEMU's HPET, serial port, virtio config/ISR, VGA).

The register semantics are the few the modelled guest OS uses; what matters to the MMU is *where*
each access goes and how often.  Every device counts its reads and writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAGE = 0x1000


@dataclass
class Device:
    """An MMIO device: [base, base + size), in the kernel or in the VMM."""

    name: str
    base: int
    size: int = PAGE
    in_kernel: bool = False
    reads: int = 0
    writes: int = 0
    regs: dict[int, int] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def where(self) -> str:
        return "kernel" if self.in_kernel else "userspace"

    # The io-bus protocol (kvm_io_device_ops): None / False = not handled (-EOPNOTSUPP).
    def read(self, addr: int, length: int) -> int | None:
        self.reads += 1
        return self.on_read(addr - self.base, length)

    def write(self, addr: int, length: int, value: int) -> bool:
        self.writes += 1
        self.on_write(addr - self.base, length, value)
        return True

    def on_read(self, offset: int, length: int) -> int:
        return self.regs.get(offset, 0)

    def on_write(self, offset: int, length: int, value: int) -> None:
        self.regs[offset] = value


class Lapic(Device):
    """The local APIC (xAPIC MMIO page).  KVM emulates it in the kernel; EOI at 0xB0, timer at 0x320-0x390."""

    EOI, TPR, ID, VERSION, LVT_TIMER, TMICT, TMCCT = 0xB0, 0x80, 0x20, 0x30, 0x320, 0x380, 0x390

    def __init__(self, base: int = 0xFEE00000, in_kernel: bool = True) -> None:
        super().__init__("lapic", base, PAGE, in_kernel)
        self.eois = 0
        self.regs[self.VERSION] = 0x50014

    def on_write(self, offset: int, length: int, value: int) -> None:
        if offset == self.EOI:
            self.eois += 1
        self.regs[offset] = value


class Ioapic(Device):
    """The IOAPIC: IOREGSEL at 0x00, IOWIN at 0x10, EOI at 0x40 (in-kernel with kernel_irqchip=on)."""

    def __init__(self, base: int = 0xFEC00000, in_kernel: bool = True) -> None:
        super().__init__("ioapic", base, PAGE, in_kernel)
        self.redirection: dict[int, int] = {}

    def on_write(self, offset: int, length: int, value: int) -> None:
        if offset == 0x10:
            self.redirection[self.regs.get(0, 0)] = value
        self.regs[offset] = value

    def on_read(self, offset: int, length: int) -> int:
        if offset == 0x10:
            sel = self.regs.get(0, 0)
            return 0x00170011 if sel == 1 else self.redirection.get(sel, 0)
        return self.regs.get(offset, 0)


class Hpet(Device):
    """The HPET (QEMU emulates it in userspace).  The main counter at 0xF0 counts in 100 ns units."""

    def __init__(self, base: int = 0xFED00000, in_kernel: bool = False) -> None:
        super().__init__("hpet", base, 0x400, in_kernel)
        self.counter = 0

    def on_read(self, offset: int, length: int) -> int:
        if offset == 0xF0:
            self.counter += 7
            return self.counter
        if offset == 0:
            return 0x8086A201 | (100_000_000 << 32) if length == 8 else 0x8086A201
        return self.regs.get(offset, 0)


class Uart16550(Device):
    """A 16550 serial port on MMIO: THR at 0, LSR at 5 (always ready).  Bytes written are kept."""

    def __init__(self, base: int = 0xFEB00000, in_kernel: bool = False) -> None:
        super().__init__("serial", base, PAGE, in_kernel)
        self.output = bytearray()

    def on_write(self, offset: int, length: int, value: int) -> None:
        if offset == 0:
            self.output.append(value & 0xFF)
        self.regs[offset] = value

    def on_read(self, offset: int, length: int) -> int:
        return 0x60 if offset == 5 else self.regs.get(offset, 0)


class VirtioDoorbell(Device):
    """A virtio-pci notify region (queue doorbells).  With ioeventfd it is in the kernel: as QEMU does
    when KVM accepts any-length ioeventfds, each queue's notify address (queue index x the notify
    offset multiplier, 4) gets a length-0 ioeventfd, so a write there signals an eventfd and the guest
    continues (under EPT straight from the EPT misconfiguration: the fast MMIO bus); reads, and writes
    elsewhere in the region, go to the VMM."""

    NOTIFY_OFF_MULTIPLIER = 4

    def __init__(self, name: str, base: int, in_kernel: bool = True, queues: int = 2) -> None:
        super().__init__(name, base, PAGE, in_kernel)
        self.kicks = 0
        self.queues = queues

    def notify_addrs(self) -> list[int]:
        return [self.base + q * self.NOTIFY_OFF_MULTIPLIER for q in range(self.queues)]

    def signal(self, addr: int, length: int, value: int) -> None:
        """The ioeventfd's `on_signal`: a doorbell write KVM completed in the kernel (an eventfd
        has no io-bus result to return, unlike `write`)."""
        self.write(addr, length, value)

    def read(self, addr: int, length: int) -> int | None:
        if self.in_kernel:
            return None           # an ioeventfd handles writes only
        return super().read(addr, length)

    def on_write(self, offset: int, length: int, value: int) -> None:
        self.kicks += 1


class VirtioConfig(Device):
    """The virtio-pci common config + ISR page (userspace in QEMU).  Reading the ISR (offset 0x800)
    acknowledges the interrupt (INTx); MSI-X drivers never read it."""

    ISR = 0x800

    def __init__(self, name: str, base: int) -> None:
        super().__init__(name, base, PAGE, False)
        self.isr = 0

    def on_read(self, offset: int, length: int) -> int:
        if offset == self.ISR:
            v, self.isr = self.isr, 0
            return v
        return self.regs.get(offset, 0)


class E1000(Device):
    """An e1000-like NIC register BAR (userspace in QEMU): TDT 0x3818, RDT 0x2818, ICR 0xC0, IMS 0xD0, IMC 0xD8."""

    TDT, RDT, ICR, IMS, IMC = 0x3818, 0x2818, 0xC0, 0xD0, 0xD8

    def __init__(self, base: int) -> None:
        super().__init__("e1000", base, 0x20000, False)
        self.icr = 0
        self.tx = 0

    def on_write(self, offset: int, length: int, value: int) -> None:
        if offset == self.TDT:
            self.tx += 1
        self.regs[offset] = value

    def on_read(self, offset: int, length: int) -> int:
        if offset == self.ICR:
            v, self.icr = self.icr, 0
            return v
        return self.regs.get(offset, 0)


class Vga(Device):
    """The legacy VGA window 0xA0000-0xBFFFF (userspace)."""

    def __init__(self) -> None:
        super().__init__("vga", 0xA0000, 0x20000, False)


class PciTestDev(Device):
    """QEMU's pci-testdev memory BAR, used by kvm-unit-tests' vmexit mmio tests.  With an ioeventfd
    (`in_kernel=True`) writes complete in the kernel; reads always go to userspace."""

    def __init__(self, base: int, in_kernel: bool = False, name: str = "pci-testdev") -> None:
        super().__init__(name, base, PAGE, in_kernel)

    def read(self, addr: int, length: int) -> int | None:
        if self.in_kernel:
            return None
        return super().read(addr, length)


class Unassigned(Device):
    """What answers an access to no device at all: reads float to all ones, writes are dropped."""

    def __init__(self) -> None:
        super().__init__("unassigned", 0, 1 << 64, False)

    def on_read(self, offset: int, length: int) -> int:
        return (1 << (8 * length)) - 1

    def on_write(self, offset: int, length: int, value: int) -> None:
        pass
