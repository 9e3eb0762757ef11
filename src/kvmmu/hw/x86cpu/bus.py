"""What the software CPU needs from the host profile (the `Bus`), and the exceptions that cross it:
guest exceptions (CpuFault), the end of a run (Stop), a hand-over to KVM's emulator (Reexecute),
and the typed errors a run can end in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ...errors import KvmmuError

if TYPE_CHECKING:
    from .core import X86Cpu


class CpuFault(Exception):
    """An exception the instruction raises (delivered through the guest's IDT)."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2
        super().__init__(f"vector {vector} error {error_code} cr2 {cr2}")


class StepLimitExceeded(KvmmuError):
    """The guest ran more instructions than the step limit allows without stopping."""

    def __init__(self, limit: int, rip: int) -> None:
        self.limit, self.rip = limit, rip
        super().__init__(f"max_steps={limit}: the guest did not stop (hlt, shutdown) within {limit} "
                         f"instructions; rip={rip:#x}")


class UnsupportedInstruction(KvmmuError):
    """The software CPU does not implement this instruction (or this form of it)."""

    def __init__(self, rip: int, text: str, why: str = "not implemented by the software CPU") -> None:
        self.rip, self.text = rip, text
        super().__init__(f"instruction at rip={rip:#x} {text!r}: {why}")


class Stop(Exception):
    """Raised by a bus to end the current run with a reason ("hlt", "internal_error", ...)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason, self.detail = reason, detail
        super().__init__(reason if not detail else f"{reason}: {detail}")


class Reexecute(Exception):
    """Raised by a bus for a ``restart`` read: KVM's emulator executes this instruction from its start
    (x86_emulate_instruction decodes it afresh), so its accesses come in the emulator's order."""


class Bus(Protocol):
    """What the CPU needs from the host profile.  Accesses raise CpuFault for a guest exception."""

    def begin(self, cpu: X86Cpu) -> None: ...            # an instruction starts at cpu.rip
    def commit(self, cpu: X86Cpu) -> None: ...           # it retired
    def abort(self, cpu: X86Cpu, fault: CpuFault) -> None: ...   # it faulted (before delivery)
    def fetch(self, gva: int, n: int, cpl: int) -> bytes: ...
    def read(self, gva: int, size: int, cpl: int, implicit: bool = False, rmw: bool = False,
             restart: bool = False) -> int: ...   # restart: may raise Reexecute before any effect
    def write(self, gva: int, size: int, value: int, cpl: int, implicit: bool = False) -> None: ...
    def rep_yield(self, cpu: X86Cpu) -> bool: ...        # after a string iteration: stop here?
    def noncanonical_tail(self, cpu: X86Cpu) -> bool: ...   # only the last bytes are non-canonical: go on?
    def write_cr(self, cpu: X86Cpu, cr: int, value: int) -> None: ...     # MOV to CR0/CR3/CR4
    def read_cr(self, cpu: X86Cpu, cr: int) -> None: ...     # MOV from CR0/CR2/CR3/CR4 (an intercept?)
    def cmps_source_first(self, cpu: X86Cpu, prefix: str, size: int) -> bool: ...   # CPU's CMPS order
    def soft_int(self, cpu: X86Cpu, vector: int) -> bool: ...  # INT n/INT3; True: deliver, skip DPL check
    def unemulatable(self, cpu: X86Cpu, what: str) -> None: ...  # KVM's emulator cannot do this one
    def invlpg(self, cpu: X86Cpu, gva: int) -> None: ...
    def halt(self, cpu: X86Cpu) -> None: ...             # HLT at CPL0 (raises Stop("hlt"))
    def iret(self, cpu: X86Cpu, new_cpl: int) -> None: ...   # IRETQ retired
    def deliver_begin(self, cpu: X86Cpu, vector: int) -> None: ...
    def deliver_end(self, cpu: X86Cpu, vector: int) -> None: ...
    # Delivering `vector` faulted.  True: the host makes it #DF whatever the exception classes.
    def deliver_failed(self, cpu: X86Cpu, vector: int) -> bool | None: ...
