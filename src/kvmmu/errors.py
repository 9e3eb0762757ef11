"""Typed errors.  Every error a user can cause names the bad value and the rule it broke."""

from __future__ import annotations

import re

# Names whose values are addresses, registers or bit masks: a KVM engineer reads those in hex.  Every
# other integer (a count, a size in MiB, a level, an index) is shown as the user wrote it: in decimal.
_HEX_NAME = re.compile(r"(addr|address|gva|gpa|gfn|pfn|hva|phys|cr[02348]|efer|eptp|flags|mask|pte|base|pool|"
                       r"memory_size|value|data|rip|rsp|pkru|page|pci_hole)", re.IGNORECASE)
_REGISTER = re.compile(r"r[abcd]x|r[sd]i|r[sb]p|rip|r(8|9|1[0-5])|rflags|dr[0-7]|xcr0", re.IGNORECASE)
_DECIMAL_NAME = re.compile(r"maxphyaddr|page_size|pages|_mib|_kib|count", re.IGNORECASE)


def format_value(what: str, value: object) -> str:
    """How an error message shows `value` of the field `what`: hex for addresses, registers and masks,
    decimal for every other integer (so `ram_mib=-512` reads as typed), repr for the rest."""
    if isinstance(value, int) and not isinstance(value, bool):
        last = re.split(r"[.\[\] ]", what.strip())[-1] or what
        if _REGISTER.fullmatch(last) or _HEX_NAME.search(last) and not _DECIMAL_NAME.search(last):
            return hex(value)
        return str(value)
    return repr(value)


class KvmmuError(Exception):
    """Base class of every error kvmmu raises on purpose."""


class InvalidArgument(KvmmuError, ValueError):
    """A value given to the API breaks a documented rule (KVM would say -EINVAL)."""

    def __init__(self, what: str, value: object, rule: str) -> None:
        self.what, self.value, self.rule = what, value, rule
        super().__init__(f"{what}={format_value(what, value)}: {rule}")


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
