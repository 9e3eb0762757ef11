"""kvmmu: an executable model of the Linux KVM x86 MMU, centred on MMIO page-fault handling."""

from .errors import AuditError, InvalidArgument, KvmBug, KvmmuError, MemslotError, ScenarioError

__version__ = "0.1.0"

__all__ = ["AuditError", "InvalidArgument", "KvmBug", "KvmmuError", "MemslotError", "ScenarioError",
           "__version__"]
