"""Flag-control and system instructions: PUSHF/POPF, CLC..STI, STAC/CLAC, HLT, INVLPG and the
undefined opcodes UD0/UD1/UD2."""

from __future__ import annotations

import iced_x86 as ix

from .bus import CpuFault
from .constants import AC, ARITH_FLAGS, CF, CR4_SMAP, DF, IF, M64, MASKS, NT, RF, RFLAGS_FIXED, RSP, TF, UD
from .core import X86Cpu, handles

_I = ix.Mnemonic


@handles(_I.PUSHFQ, _I.PUSHF)
def _pushfq(cpu: X86Cpu, instr: ix.Instruction) -> None:
    size = -instr.stack_pointer_increment         # PUSHF with a 66 prefix stores FLAGS (2 bytes)
    cpu.push(cpu.rflags & ~(RF | 0x20000) & MASKS[size], size)
    cpu.advance()


@handles(_I.POPFQ, _I.POPF)
def _popfq(cpu: X86Cpu, instr: ix.Instruction) -> None:
    size = instr.stack_pointer_increment          # POPF with a 66 prefix loads FLAGS only
    value = cpu.pop(size)
    cpu.regs[RSP] = (cpu.regs[RSP] + size) & M64
    writable = (ARITH_FLAGS | TF | DF | NT | AC | 0x200000) & MASKS[size]
    if cpu.cpl == 0:
        writable |= IF | 0x3000
    cpu.rflags = (cpu.rflags & ~writable) | (value & writable) | RFLAGS_FIXED
    cpu.advance()


@handles(_I.CLC, _I.STC, _I.CMC, _I.CLD, _I.STD, _I.CLI, _I.STI)
def _flagop(cpu: X86Cpu, instr: ix.Instruction) -> None:
    mn = instr.mnemonic
    if mn in (_I.CLI, _I.STI):
        cpu.privileged()
        cpu.rflags = cpu.rflags | IF if mn == _I.STI else cpu.rflags & ~IF
    elif mn == _I.CLC:
        cpu.rflags &= ~CF
    elif mn == _I.STC:
        cpu.rflags |= CF
    elif mn == _I.CMC:
        cpu.rflags ^= CF
    elif mn == _I.CLD:
        cpu.rflags &= ~DF
    else:
        cpu.rflags |= DF
    cpu.advance()


@handles(_I.HLT)
def _hlt(cpu: X86Cpu, instr: ix.Instruction) -> None:
    cpu.privileged()
    cpu.advance()
    cpu.rflags &= ~RF
    cpu.bus.commit(cpu)
    cpu.bus.halt(cpu)


@handles(_I.UD2)
def _ud2(cpu: X86Cpu, instr: ix.Instruction) -> None:
    raise CpuFault(UD)


@handles(_I.UD0, _I.UD1)
def _ud0(cpu: X86Cpu, instr: ix.Instruction) -> None:
    """UD0/UD1: #UD (SDM); KVM's emulator does not know them (an emulation failure where it runs)."""
    cpu.bus.unemulatable(cpu, cpu.text(instr))
    raise CpuFault(UD)


@handles(_I.STAC, _I.CLAC)
def _stac(cpu: X86Cpu, instr: ix.Instruction) -> None:
    cpu.bus.unemulatable(cpu, cpu.text(instr))
    if cpu.cpl != 0 or not cpu.cr4 & CR4_SMAP:
        raise CpuFault(UD)
    cpu.rflags = cpu.rflags | AC if instr.mnemonic == _I.STAC else cpu.rflags & ~AC
    cpu.advance()


@handles(_I.INVLPG)
def _invlpg(cpu: X86Cpu, instr: ix.Instruction) -> None:
    cpu.privileged()
    cpu.bus.invlpg(cpu, cpu.ea(instr))
    cpu.advance()
