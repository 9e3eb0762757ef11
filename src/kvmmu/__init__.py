"""kvmmu: an executable model of the Linux KVM x86 MMU, centred on MMIO page-fault handling.

What a user needs is importable from here: the VM and its vCPUs, the host, KVM's module parameters,
the errors, guest page-table building, and the x86 bits (`kvmmu.bits`).  The real-KVM backend is
`kvmmu.real` (it needs /dev/kvm); the layers behind these names are mapped in docs/ARCHITECTURE.md.
"""

# _native first: it decides whether the hot modules load compiled or from source before any does.
from . import _native, bits  # noqa: F401
from .errors import AuditError, HostOutOfMemory, InvalidArgument, KvmBug, KvmmuError, MemslotError, ScenarioError
from .guest.pagetables import NX, RW, US, GuestPageTables, P, vcpu_writer, vm_writer
from .hw.host import Host
from .kvm.emulate import MmioExit
from .kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from .kvm.params import KvmParams
from .kvm.vcpu import AccessResult, GuestFault, Vcpu
from .kvm.vm import VM

__version__ = "0.1.0"

__all__ = [
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "NX", "RW", "US", "VM", "AccessResult", "AuditError",
    "GuestFault", "GuestPageTables", "Host", "HostOutOfMemory", "InvalidArgument", "KvmBug", "KvmParams",
    "KvmmuError", "MemslotError", "MmioExit", "P", "ScenarioError", "Vcpu", "__version__", "bits",
    "vcpu_writer", "vm_writer",
]
