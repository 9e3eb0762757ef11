"""String instructions (MOVS, STOS, LODS, CMPS, SCAS, with REP/REPE/REPNE): one iteration committed at a
time, and CMPS's operand order, which differs between the CPU and KVM's emulator."""

from __future__ import annotations

import iced_x86 as ix

from .bus import Reexecute, UnsupportedInstruction
from .constants import DF, M64, MASKS, RAX, RCX, RDI, RSI, ZF
from .core import X86Cpu, handles

_I = ix.Mnemonic
_K = ix.OpKind
_R = ix.Register


_STRING = {
    _I.MOVSB: ("movs", 1), _I.MOVSW: ("movs", 2), _I.MOVSD: ("movs", 4), _I.MOVSQ: ("movs", 8),
    _I.STOSB: ("stos", 1), _I.STOSW: ("stos", 2), _I.STOSD: ("stos", 4), _I.STOSQ: ("stos", 8),
    _I.LODSB: ("lods", 1), _I.LODSW: ("lods", 2), _I.LODSD: ("lods", 4), _I.LODSQ: ("lods", 8),
    _I.CMPSB: ("cmps", 1), _I.CMPSW: ("cmps", 2), _I.CMPSD: ("cmps", 4), _I.CMPSQ: ("cmps", 8),
    _I.SCASB: ("scas", 1), _I.SCASW: ("scas", 2), _I.SCASD: ("scas", 4), _I.SCASQ: ("scas", 8),
}


@handles(*_STRING)
def _string(cpu: X86Cpu, instr: ix.Instruction) -> None:
    if instr.mnemonic == _I.MOVSD and instr.op_count == 2 and instr.op0_kind == _K.REGISTER:
        raise UnsupportedInstruction(cpu.rip, cpu.text(instr), "SSE MOVSD is not implemented")
    kind, size = _STRING[instr.mnemonic]
    rep = instr.has_rep_prefix or instr.has_repe_prefix or instr.has_repne_prefix
    regs = cpu.regs
    step = -size if cpu.rflags & DF else size
    while True:
        if rep and regs[RCX] == 0:
            break
        rsi, rdi = regs[RSI], regs[RDI]
        zf_stop = False
        if kind == "movs":
            cpu.store(rdi, size, cpu.load(rsi, size))
            regs[RSI], regs[RDI] = (rsi + step) & M64, (rdi + step) & M64
        elif kind == "stos":
            cpu.store(rdi, size, regs[RAX] & MASKS[size])
            regs[RDI] = (rdi + step) & M64
        elif kind == "lods":
            cpu.set({1: _R.AL, 2: _R.AX, 4: _R.EAX, 8: _R.RAX}[size], cpu.load(rsi, size))
            regs[RSI] = (rsi + step) & M64
        else:
            if kind == "cmps":
                prefix = "repe" if instr.has_repe_prefix else "repne" if instr.has_repne_prefix else ""
                if cpu.bus.cmps_source_first(cpu, prefix, size):
                    a = cpu.load(rsi, size)         # the CPU's order is KVM's emulator's: no restart
                    b = cpu.load(rdi, size)
                else:
                    a, b = _cmps_operands(cpu, rsi, rdi, size)
                regs[RSI] = (rsi + step) & M64
            else:
                a, b = regs[RAX] & MASKS[size], cpu.load(rdi, size)
            regs[RDI] = (rdi + step) & M64
            cpu.flags_sub(a, b, 0, size)
            if instr.has_repe_prefix:
                zf_stop = not cpu.rflags & ZF
            elif instr.has_repne_prefix:
                zf_stop = bool(cpu.rflags & ZF)
        if not rep:
            break
        regs[RCX] = (regs[RCX] - 1) & M64
        if zf_stop:
            break
        if cpu.bus.rep_yield(cpu):
            return                  # re-executed from this RIP (KVM's emulator re-enters the guest)
        if regs[RCX] == 0:
            break
    cpu.advance()


def _cmps_operands(cpu: X86Cpu, rsi: int, rdi: int, size: int) -> tuple[int, int]:
    """CMPS on the CPU reads ES:[RDI] before DS:[RSI] (the SDM names no order; measured: when both
    fault, CR2 is RDI — except the forms ``Bus.cmps_source_first`` names, see
    kvmmu.realdiff.cmps_order); KVM's emulator reads the source first (x86_emulate_insn reads
    src, then dst).  The bus raises Reexecute when KVM's emulator runs the instruction — at once,
    or after the CPU's access to RDI faulted into KVM's emulation path."""
    try:
        b = cpu.load(rdi, size, restart=True)
    except Reexecute:
        a = cpu.load(rsi, size)
        return a, cpu.load(rdi, size)
    return cpu.load(rsi, size), b
