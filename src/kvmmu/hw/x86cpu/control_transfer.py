"""Control-transfer instructions (SDM Vol. 1 5.1.7): Jcc, JMP, LOOP/JRCXZ, CALL, RET, LEAVE, INT n/INT3
and IRETQ (the return from the runtime's exception handlers, ring changes included)."""

from __future__ import annotations

import iced_x86 as ix

from .bus import CpuFault, UnsupportedInstruction
from .constants import AC, ARITH_FLAGS, DF, GP, IF, M64, MASKS, NT, RCX, RF, RFLAGS_FIXED, RSP, TF, ZF, is_canonical
from .core import X86Cpu, handles

_I = ix.Mnemonic
_K = ix.OpKind


@handles(_I.JO, _I.JNO, _I.JB, _I.JAE, _I.JE, _I.JNE, _I.JBE, _I.JA, _I.JS, _I.JNS, _I.JP, _I.JNP, _I.JL, _I.JGE,
     _I.JLE, _I.JG)
def _jcc(cpu: X86Cpu, instr: ix.Instruction) -> None:
    if cpu.cond(instr.condition_code):
        cpu.rip = instr.near_branch_target
    else:
        cpu.advance()


@handles(_I.JMP)
def _jmp(cpu: X86Cpu, instr: ix.Instruction) -> None:
    if instr.op0_kind == _K.NEAR_BRANCH64:
        cpu.rip = instr.near_branch_target
    elif instr.op0_kind in (_K.REGISTER, _K.MEMORY):
        target = cpu.read_op(instr, 0, 8)
        if not is_canonical(target):
            raise CpuFault(GP, 0)
        cpu.rip = target
    else:
        raise UnsupportedInstruction(cpu.rip, cpu.text(instr), "far jumps are not modelled")


@handles(_I.LOOP, _I.LOOPE, _I.LOOPNE, _I.JRCXZ, _I.JECXZ)
def _loop(cpu: X86Cpu, instr: ix.Instruction) -> None:
    mn = instr.mnemonic
    if mn in (_I.JRCXZ, _I.JECXZ):
        size = 8 if mn == _I.JRCXZ else 4
        taken = cpu.regs[RCX] & MASKS[size] == 0
    else:
        rcx = (cpu.regs[RCX] - 1) & M64
        cpu.regs[RCX] = rcx
        taken = rcx != 0
        if mn == _I.LOOPE:
            taken = taken and bool(cpu.rflags & ZF)
        elif mn == _I.LOOPNE:
            taken = taken and not cpu.rflags & ZF
    if taken:
        cpu.rip = instr.near_branch_target
    else:
        cpu.advance()


@handles(_I.CALL)
def _call(cpu: X86Cpu, instr: ix.Instruction) -> None:
    if instr.op0_kind == _K.NEAR_BRANCH64:
        target = instr.near_branch_target
    elif instr.op0_kind in (_K.REGISTER, _K.MEMORY):
        target = cpu.read_op(instr, 0, 8)
    else:
        raise UnsupportedInstruction(cpu.rip, cpu.text(instr), "far calls are not modelled")
    if not is_canonical(target):
        raise CpuFault(GP, 0)
    cpu.push(instr.next_ip)
    cpu.rip = target


@handles(_I.RET)
def _ret(cpu: X86Cpu, instr: ix.Instruction) -> None:
    target = cpu.pop()
    extra = instr.immediate16 if instr.op_count else 0
    if not is_canonical(target):
        raise CpuFault(GP, 0)
    cpu.regs[RSP] = (cpu.regs[RSP] + 8 + extra) & M64
    cpu.rip = target


@handles(_I.LEAVE)
def _leave(cpu: X86Cpu, instr: ix.Instruction) -> None:
    rbp = cpu.regs[5]
    cpu._stack_ref = True
    try:
        value = cpu.load(rbp, 8)
    finally:
        cpu._stack_ref = False
    cpu.regs[RSP] = (rbp + 8) & M64
    cpu.regs[5] = value
    cpu.advance()


@handles(_I.INT3, _I.INT)
def _int(cpu: X86Cpu, instr: ix.Instruction) -> None:
    """INT3 / INT n: a trap through the IDT (RIP after the instruction) if the gate's DPL allows it."""
    vector = 3 if instr.mnemonic == _I.INT3 else instr.immediate8
    skip_dpl = cpu.bus.soft_int(cpu, vector)
    idt_base, idt_limit = cpu.idt
    if 16 * vector + 15 > idt_limit:
        raise CpuFault(GP, vector * 8 + 2)
    if not skip_dpl:
        lo = cpu.bus.read(idt_base + 16 * vector, 8, 0, implicit=True)
        if (lo >> 45) & 3 < cpu.cpl:
            raise CpuFault(GP, vector * 8 + 2)
    cpu.deliver(vector, None, None, instr.next_ip)


@handles(_I.IRETQ)
def _iretq(cpu: X86Cpu, instr: ix.Instruction) -> None:
    rsp = cpu.regs[RSP]
    cpu._stack_ref = True
    try:
        rip, cs, rflags, new_rsp, ss = (cpu.load((rsp + 8 * i) & M64, 8) for i in range(5))
    finally:
        cpu._stack_ref = False
    cs &= 0xFFFF
    ss &= 0xFFFF
    new_cpl = cs & 3
    if new_cpl < cpu.cpl:
        raise CpuFault(GP, cs & ~3)
    desc = cpu._descriptor(cs)
    if (desc >> 45) & 3 != new_cpl or not (desc >> 47) & 1 or not (desc >> 53) & 1:
        raise CpuFault(GP, cs & ~3)
    if new_cpl != cpu.cpl or ss & ~3:
        if ss & ~3:
            sdesc = cpu._descriptor(ss)
            if (sdesc >> 45) & 3 != new_cpl or (ss & 3) != new_cpl:
                raise CpuFault(GP, ss & ~3)
        elif new_cpl == 3:
            raise CpuFault(GP, 0)
    if not is_canonical(rip):
        raise CpuFault(GP, 0)
    writable = ARITH_FLAGS | TF | DF | NT | AC | RF | 0x200000
    if cpu.cpl == 0:
        writable |= IF | 0x3000
    cpu.rflags = (cpu.rflags & ~writable) | (rflags & writable) | RFLAGS_FIXED
    cpu.rip, cpu.cs, cpu.ss, cpu.regs[RSP] = rip, cs, ss, new_rsp & M64
    cpu.cpl = new_cpl
    cpu.bus.iret(cpu, new_cpl)
