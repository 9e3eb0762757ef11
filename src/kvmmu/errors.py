"""Typed errors.  Every error a user can cause names the bad value and the rule it broke."""

from __future__ import annotations


class KvmmuError(Exception):
    """Base class of every error kvmmu raises on purpose."""


class InvalidArgument(KvmmuError, ValueError):
    """A value given to the API breaks a documented rule (KVM would say -EINVAL)."""

    def __init__(self, what: str, value: object, rule: str) -> None:
        self.what, self.value, self.rule = what, value, rule
        shown = hex(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)
        super().__init__(f"{what}={shown}: {rule}")


class MemslotError(InvalidArgument):
    """KVM_SET_USER_MEMORY_REGION refused the change (-EINVAL / -EEXIST); the VM is unchanged."""

    def __init__(self, what: str, value: object, rule: str, errno_name: str = "EINVAL") -> None:
        self.errno_name = errno_name
        super().__init__(what, value, f"{rule} (-{errno_name})")


class HostOutOfMemory(InvalidArgument):
    """The host's memory_limit cannot hold KVM's own pages plus the guest pages one access needs at once.

    Linux would have nothing left to reclaim and its OOM killer would kill a process (the VMM, whose
    guest RAM is the biggest); the model stops the VM with this error instead of livelocking.
    """


class KvmBug(KvmmuError):
    """The model reached a state KVM would WARN about (e.g. a reserved bit in a non-MMIO spte)."""


class AuditError(KvmmuError):
    """vm.audit() found a broken invariant of the MMU."""


class ScenarioError(KvmmuError):
    """A scenario, trace or workload file could not be used."""
