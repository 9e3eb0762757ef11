"""What a guest kernel knows of the machine it boots on, as its firmware would tell it.

The guest sits below the VMM in the layers (docs/ARCHITECTURE.md), so it names no VMM class: a
machine is anything with these fields (vmm/machine.py's Machine is one).  The memory map is the
e820 table; `spec` the board's configuration; the devices are found where firmware reports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..kvm.vcpu import Vcpu
    from ..kvm.vm import VM


class PlatformSpec(Protocol):
    name: str
    mmu: str                      # the VM's MMU flavour (the cost model charges by it)
    msix: bool
    framebuffer_mib: int

    @property
    def lowmem_end(self) -> int: ...


class Platform(Protocol):
    vm: VM
    vcpus: list[Vcpu]
    spec: PlatformSpec
    e1000: object | None          # the e1000 NIC, when the board has one (else virtio-net)
    fb_slot: int                  # the framebuffer's memslot (dirty-logged)
    first_free_slot: int          # the first memslot the board leaves free

    def ram_ranges(self) -> list[tuple[int, int]]: ...

    def refresh_display(self) -> set[int]: ...


__all__ = ["Platform", "PlatformSpec"]
