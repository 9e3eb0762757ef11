"""Scripted guests: a sequence (or generator) of operations run on a vCPU.

Operations are tuples:
    ("read", gva, size) | ("write", gva, size, value) | ("fetch", gva) | ("cr3", value)
    ("invlpg", gva) | ("cpl", n) | ("halt",)
A generator receives, through send(), the AccessResult of each access (so a guest #PF handler can
be written in the program: look at result.fault, fix a PTE, retry).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from dataclasses import dataclass, field

from ..errors import ScenarioError
from ..kvm.vcpu import AccessResult, Vcpu

Op = tuple


@dataclass
class ProgramResult:
    accesses: int = 0
    faults: list[AccessResult] = field(default_factory=list)
    mmio_exits: int = 0       # KVM_EXIT_MMIO exits, as KVM counts mmio_exits
    halted: bool = False


def run_program(vcpu: Vcpu, program: Iterable[Op] | Generator[Op, AccessResult | None, None],
                max_ops: int = 10_000_000) -> ProgramResult:
    out = ProgramResult()
    gen = program if hasattr(program, "send") else None
    it = iter(program)
    reply: AccessResult | None = None
    for n in range(max_ops + 1):
        try:
            op = gen.send(reply) if gen is not None and n else next(it)
        except StopIteration:
            return out
        reply = None
        if not isinstance(op, tuple) or not op:
            raise ScenarioError(f"operation {n}: {op!r} is not a non-empty tuple")
        kind = op[0]
        try:
            if kind == "read":
                reply = vcpu.access(op[1], op[2], "read")
            elif kind == "write":
                reply = vcpu.access(op[1], op[2], "write", op[3])
            elif kind == "fetch":
                reply = vcpu.access(op[1], op[2] if len(op) > 2 else 1, "fetch")
            elif kind == "cr3":
                vcpu.write_cr3(op[1])
            elif kind == "invlpg":
                vcpu.invlpg(op[1])
            elif kind == "cpl":
                vcpu.cpl = op[1]
            elif kind == "halt":
                vcpu.stats["halt_exits"] += 1
                vcpu.stats["exits"] += 1
                out.halted = True
                return out
            else:
                raise ScenarioError(f"operation {n}: unknown kind {kind!r}")
        except IndexError:
            raise ScenarioError(f"operation {n}: {op!r} lacks arguments for {kind!r}") from None
        if reply is not None:
            out.accesses += 1
            out.mmio_exits += len(reply.mmio_exit_records)
            if reply.fault is not None:
                out.faults.append(reply)
    raise ScenarioError(f"the program ran more than {max_ops} operations (max_ops)")
