"""kvmmu: an executable model of the Linux KVM x86 MMU, centred on MMIO page-fault handling."""

from .errors import AuditError, HostOutOfMemory, InvalidArgument, KvmBug, KvmmuError, MemslotError, ScenarioError
from .hw.host import Host
from .kvm.emulate import MmioExit
from .kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from .kvm.params import KvmParams
from .kvm.vcpu import AccessResult, GuestFault, Vcpu
from .kvm.vm import VM

__version__ = "0.1.0"

__all__ = [
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "VM", "AccessResult", "AuditError", "GuestFault", "Host",
    "HostOutOfMemory", "InvalidArgument", "KvmBug", "KvmParams", "KvmmuError", "MemslotError", "MmioExit",
    "ScenarioError", "Vcpu",
    "__version__",
]
