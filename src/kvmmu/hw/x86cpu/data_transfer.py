"""Data-transfer instructions (SDM Vol. 1 5.1.1): MOV (to and from control registers too), MOVZX/MOVSX,
XCHG, XADD, CMPXCHG, BSWAP, CMOVcc, PUSH/POP, the sign extensions (CBW..CQO), LEA and NOP, and the
16-byte SSE moves."""

from __future__ import annotations

import iced_x86 as ix

from ...errors import InvalidArgument
from .bus import CpuFault, UnsupportedInstruction
from .constants import (
    CR0_EM,
    CR0_NW_CD,
    CR0_PG,
    CR0_TS,
    CR4_LA57,
    CR4_OSFXSR,
    CR4_PAE,
    GP,
    M16,
    M32,
    M64,
    MASKS,
    NM,
    RAX,
    RDX,
    RSP,
    SIGN,
    UD,
)
from .core import X86Cpu, handles, write_result

_I = ix.Mnemonic
_K = ix.OpKind
_R = ix.Register


_CR4_KNOWN = 0x3F | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 16) | (1 << 18) | (1 << 20) \
    | (1 << 21) | (1 << 22)


@handles(_I.NOP, _I.PAUSE, _I.LFENCE, _I.MFENCE, _I.SFENCE, _I.PREFETCHT0, _I.PREFETCHNTA)
def _nop(cpu: X86Cpu, instr: ix.Instruction) -> None:
    cpu.advance()


@handles(_I.MOV)
def _mov(cpu: X86Cpu, instr: ix.Instruction) -> None:
    k0, k1 = instr.op0_kind, instr.op1_kind
    if k0 == _K.REGISTER and ix.RegisterExt.is_cr(instr.op0_register):
        cpu.privileged()
        cr = instr.op0_register - _R.CR0
        value = cpu.get(instr.op1_register)
        if cr == 0:
            if value >> 32 or not value & CR0_PG or not value & 1 or (value & (1 << 29) and not value & CR0_NW_CD):
                raise CpuFault(GP, 0)           # long mode: PG and PE stay set
        elif cr == 4:
            if value & ~_CR4_KNOWN or not value & CR4_PAE or (value ^ cpu.cr4) & CR4_LA57:
                raise CpuFault(GP, 0)
        elif cr == 3:
            if value >> 52:
                raise CpuFault(GP, 0)
        else:
            raise UnsupportedInstruction(cpu.rip, cpu.text(instr), f"MOV to CR{cr} is not modelled")
        try:
            cpu.bus.write_cr(cpu, cr, value)
        except InvalidArgument:
            raise CpuFault(GP, 0) from None     # KVM refused the value (e.g. CR3 above MAXPHYADDR)
        setattr(cpu, f"cr{cr}", value)
        cpu.advance()
        return
    if k1 == _K.REGISTER and ix.RegisterExt.is_cr(instr.op1_register):
        cpu.privileged()
        cr = instr.op1_register - _R.CR0
        cr_value = {0: cpu.cr0, 2: cpu.cr2, 3: cpu.cr3, 4: cpu.cr4}.get(cr)
        if cr_value is None:
            raise UnsupportedInstruction(cpu.rip, cpu.text(instr), f"CR{cr} is not modelled")
        cpu.bus.read_cr(cpu, cr)
        cpu.set(instr.op0_register, cr_value)
        cpu.advance()
        return
    if (k0 == _K.REGISTER and ix.RegisterExt.is_segment_register(instr.op0_register)) or \
            (k1 == _K.REGISTER and ix.RegisterExt.is_segment_register(instr.op1_register)):
        raise UnsupportedInstruction(cpu.rip, cpu.text(instr), "segment registers are not modelled")
    size = cpu.op_size(instr, 0)
    cpu.write_op(instr, 0, cpu.read_op(instr, 1, size), size)
    cpu.advance()


@handles(_I.MOVZX)
def _movzx(cpu: X86Cpu, instr: ix.Instruction) -> None:
    value = cpu.read_op(instr, 1)
    cpu.write_op(instr, 0, value)
    cpu.advance()


@handles(_I.MOVSX, _I.MOVSXD)
def _movsx(cpu: X86Cpu, instr: ix.Instruction) -> None:
    src = cpu.op_size(instr, 1)
    value = cpu.read_op(instr, 1)
    if value & SIGN[src]:
        value -= 1 << (8 * src)
    cpu.write_op(instr, 0, value & MASKS[cpu.op_size(instr, 0)])
    cpu.advance()


@handles(_I.LEA)
def _lea(cpu: X86Cpu, instr: ix.Instruction) -> None:
    cpu.set(instr.op0_register, cpu.ea(instr))
    cpu.advance()


@handles(_I.XCHG)
def _xchg(cpu: X86Cpu, instr: ix.Instruction) -> None:
    size = cpu.op_size(instr, 0)
    a, b = cpu.read_op(instr, 0, size, rmw=True), cpu.read_op(instr, 1, size, rmw=True)
    if instr.op0_kind == _K.MEMORY:
        cpu.write_op(instr, 0, b, size)
        cpu.write_op(instr, 1, a, size)
    else:
        cpu.write_op(instr, 1, a, size)
        cpu.write_op(instr, 0, b, size)
    cpu.advance()


@handles(_I.BSWAP)
def _bswap(cpu: X86Cpu, instr: ix.Instruction) -> None:
    size = cpu.op_size(instr, 0)
    v = cpu.read_op(instr, 0, size)
    cpu.write_op(instr, 0, int.from_bytes(v.to_bytes(size, "little"), "big"), size)
    cpu.advance()


@handles(_I.CBW, _I.CWDE, _I.CDQE)
def _cbw(cpu: X86Cpu, instr: ix.Instruction) -> None:
    src = {_I.CBW: 1, _I.CWDE: 2, _I.CDQE: 4}[instr.mnemonic]
    v = cpu.regs[RAX] & MASKS[src]
    if v & SIGN[src]:
        v -= 1 << (8 * src)
    dst = src * 2
    if dst == 8:
        cpu.regs[RAX] = v & M64
    elif dst == 4:
        cpu.regs[RAX] = v & M32
    else:
        cpu.regs[RAX] = (cpu.regs[RAX] & ~M16) | (v & M16)
    cpu.advance()


@handles(_I.CWD, _I.CDQ, _I.CQO)
def _cqo(cpu: X86Cpu, instr: ix.Instruction) -> None:
    size = {_I.CWD: 2, _I.CDQ: 4, _I.CQO: 8}[instr.mnemonic]
    neg = cpu.regs[RAX] & SIGN[size]
    fill = MASKS[size] if neg else 0
    if size == 2:
        cpu.regs[RDX] = (cpu.regs[RDX] & ~M16) | fill
    else:
        cpu.regs[RDX] = fill
    cpu.advance()


@handles(_I.CMOVO, _I.CMOVNO, _I.CMOVB, _I.CMOVAE, _I.CMOVE, _I.CMOVNE, _I.CMOVBE, _I.CMOVA, _I.CMOVS,
     _I.CMOVNS, _I.CMOVP, _I.CMOVNP, _I.CMOVL, _I.CMOVGE, _I.CMOVLE, _I.CMOVG)
def _cmov(cpu: X86Cpu, instr: ix.Instruction) -> None:
    size = cpu.op_size(instr, 0)
    value = cpu.read_op(instr, 1, size)
    if cpu.cond(instr.condition_code):
        cpu.write_op(instr, 0, value, size)
    elif size == 4:
        cpu.write_op(instr, 0, cpu.read_op(instr, 0, 4), 4)      # 32-bit CMOV zero-extends anyway
    cpu.advance()


@handles(_I.PUSH)
def _push(cpu: X86Cpu, instr: ix.Instruction) -> None:
    if instr.op0_kind == _K.REGISTER and ix.RegisterExt.is_segment_register(instr.op0_register):
        raise UnsupportedInstruction(cpu.rip, cpu.text(instr), "segment registers are not modelled")
    # The operand size is 64 or, with a 66 prefix, 16 bits (SDM PUSH: no 32-bit push in 64-bit
    # mode): push imm16 / push r16 / push m16 move RSP by 2 and store 2 bytes.
    size = -instr.stack_pointer_increment
    value = cpu.read_op(instr, 0, size)
    cpu.push(value, size)
    cpu.advance()


@handles(_I.POP)
def _pop(cpu: X86Cpu, instr: ix.Instruction) -> None:
    size = instr.stack_pointer_increment          # 8, or 2 for pop r16 / pop m16 (66 prefix)
    value = cpu.pop(size)
    old = cpu.regs[RSP]
    cpu.regs[RSP] = (old + size) & M64
    try:
        cpu.write_op(instr, 0, value, size)
    except CpuFault:
        cpu.regs[RSP] = old
        raise
    cpu.advance()


@handles(_I.XADD)
def _xadd(cpu: X86Cpu, instr: ix.Instruction) -> None:
    size = cpu.op_size(instr, 0)
    a, b = cpu.read_op(instr, 0, size, rmw=True), cpu.read_op(instr, 1, size)
    saved = cpu.rflags
    r = cpu.flags_add(a, b, 0, size)
    write_result(cpu, instr, r, size, saved)
    cpu.write_op(instr, 1, a, size)
    cpu.advance()


@handles(_I.CMPXCHG)
def _cmpxchg(cpu: X86Cpu, instr: ix.Instruction) -> None:
    size = cpu.op_size(instr, 0)
    dst = cpu.read_op(instr, 0, size, rmw=True)
    acc = cpu.regs[RAX] & MASKS[size]
    saved = cpu.rflags
    cpu.flags_sub(acc, dst, 0, size)
    try:
        if acc == dst:
            cpu.write_op(instr, 0, cpu.read_op(instr, 1, size), size)
        elif instr.op0_kind == _K.MEMORY:
            cpu.write_op(instr, 0, dst, size)       # a mismatch still writes the old value back
    except CpuFault:
        cpu.rflags = saved
        raise
    if acc != dst:
        cpu.set({1: _R.AL, 2: _R.AX, 4: _R.EAX, 8: _R.RAX}[size], dst)
    cpu.advance()


@handles(_I.MOVDQU, _I.MOVDQA, _I.MOVUPS, _I.MOVAPS, _I.MOVUPD, _I.MOVAPD, _I.MOVNTDQ, _I.MOVNTPS, _I.LDDQU)
def _movdq(cpu: X86Cpu, instr: ix.Instruction) -> None:
    if not cpu.cr4 & CR4_OSFXSR or cpu.cr0 & CR0_EM:
        raise CpuFault(UD)
    if cpu.cr0 & CR0_TS:
        raise CpuFault(NM)
    aligned = instr.mnemonic in (_I.MOVDQA, _I.MOVAPS, _I.MOVAPD, _I.MOVNTDQ, _I.MOVNTPS)
    if aligned and (instr.op0_kind == _K.MEMORY or instr.op1_kind == _K.MEMORY) and cpu.ea(instr) & 15:
        raise CpuFault(GP, 0)
    value = cpu.read_op(instr, 1, 16)
    cpu.write_op(instr, 0, value, 16)
    cpu.advance()
