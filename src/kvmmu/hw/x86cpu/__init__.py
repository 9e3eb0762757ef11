"""A software x86-64 CPU that runs test-guest machine code on the model.

It decodes with iced-x86 and executes the subset test guests use (moves, ALU, compares and jumps,
calls, push/pop, loops, string moves, 16-byte SSE moves, MOV to/from CR3, INVLPG, IRETQ, HLT, the
exception delivery and the ring transitions of the runtime).  It owns the architectural registers
and nothing else: **every memory access** — instruction fetches, data, stack pushes, IDT/GDT/TSS
reads during delivery — goes through a `Bus`, which a host profile (`kvmmu.kvm.profiles`) backs
with the model's vCPU (`vcpu.access`, KVM's software walker for emulated code, `vcpu.write_cr3`,
`vcpu.invlpg`).  So the CPU never translates an address itself, and the model decides every A/D
bit, fault and exit.

Faults are precise: an instruction's memory writes happen before its register writes, and an
instruction that faults changes no register (string instructions commit per iteration).  A fault
is delivered through the 64-bit IDT (stack switch from TSS.RSP0 on a ring change, RF set in the
saved RFLAGS of a fault), a fault while delivering becomes #DF, and one while delivering #DF is a
triple fault (the run stops with "shutdown").

The package: `core` (X86Cpu: the state, the loop, delivery and operand access), `flags` (RFLAGS
arithmetic and condition codes), `bus` (the Bus protocol and the exceptions that cross it),
`constants`, and the instruction semantics by SDM group, each handler registered for its mnemonics:
`data_transfer`, `arithmetic`, `control_transfer`, `system`, `strings`.
"""

from __future__ import annotations

# The handler modules register their instructions with core.handles when imported.
from . import arithmetic, control_transfer, data_transfer, strings, system  # noqa: F401
from .bus import Bus, CpuFault, Reexecute, StepLimitExceeded, Stop, UnsupportedInstruction
from .constants import (
    AC,
    AF,
    ARITH_FLAGS,
    BP,
    CF,
    DB,
    DE,
    DF,
    DF_VEC,
    GP,
    IF,
    MASKS,
    NM,
    NP,
    NT,
    OF,
    PF,
    PF_VEC,
    RF,
    RFLAGS_FIXED,
    SF,
    SIGN,
    SS_VEC,
    TF,
    TS,
    UD,
    ZF,
)
from .core import X86Cpu

__all__ = ["AC", "AF", "ARITH_FLAGS", "BP", "CF", "DB", "DE", "DF", "DF_VEC", "GP", "IF", "MASKS", "NM", "NP", "NT",
           "OF", "PF", "PF_VEC", "RF", "RFLAGS_FIXED", "SF", "SIGN", "SS_VEC", "TF", "TS", "UD", "ZF",
           "Bus", "CpuFault", "Reexecute", "StepLimitExceeded", "Stop", "UnsupportedInstruction", "X86Cpu"]
