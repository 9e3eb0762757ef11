"""The userspace VMM (QEMU's role): machine layouts, device models, KVM_EXIT_MMIO handling, and the
host that runs several VMs' vCPU threads on its cores."""

from .devices import Device
from .machine import Machine, MachineSpec

__all__ = ["Device", "Machine", "MachineSpec"]
