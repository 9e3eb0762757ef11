"""What a guest kernel knows of the machine it boots on, as its firmware would tell it.

The guest sits below the VMM in the layers (docs/ARCHITECTURE.md), so it names no VMM class: a
machine is anything with these fields (vmm/machine.py's Machine is one).  The memory map is the
e820 table; `spec` the board's configuration; the devices are found where firmware reports them.
The guest only reads these, so they are read-only properties here: a machine may hold a more
specific type (a MachineSpec, an E1000) than the one named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..kvm.vcpu import Vcpu
    from ..kvm.vm import VM


class PlatformSpec(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def mmu(self) -> str: ...                   # the VM's MMU flavour (the cost model charges by it)
    @property
    def msix(self) -> bool: ...
    @property
    def framebuffer_mib(self) -> int: ...
    @property
    def lowmem_end(self) -> int: ...


class PlatformDevice(Protocol):
    """A device's register window, as firmware (ACPI, PCI BARs) reports it."""

    @property
    def name(self) -> str: ...
    @property
    def base(self) -> int: ...
    @property
    def size(self) -> int: ...


class Platform(Protocol):
    vm: VM
    vcpus: list[Vcpu]
    fb_slot: int                  # the framebuffer's memslot (dirty-logged)
    first_free_slot: int          # the first memslot the board leaves free

    @property
    def spec(self) -> PlatformSpec: ...
    # The devices the kernel drives (fixmap: the APICs and HPET; ioremap: the rest).
    @property
    def lapic(self) -> PlatformDevice: ...
    @property
    def ioapic(self) -> PlatformDevice: ...
    @property
    def hpet(self) -> PlatformDevice: ...
    @property
    def serial(self) -> PlatformDevice: ...
    @property
    def net_notify(self) -> PlatformDevice: ...
    @property
    def net_cfg(self) -> PlatformDevice: ...
    @property
    def blk_notify(self) -> PlatformDevice: ...
    @property
    def blk_cfg(self) -> PlatformDevice: ...
    @property
    def testdev_user(self) -> PlatformDevice: ...
    @property
    def testdev_kernel(self) -> PlatformDevice: ...
    @property
    def e1000(self) -> PlatformDevice | None: ...   # the e1000 NIC, when the board has one (else virtio-net)

    def ram_ranges(self) -> list[tuple[int, int]]: ...

    def refresh_display(self) -> set[int]: ...


__all__ = ["Platform", "PlatformDevice", "PlatformSpec"]
