"""Which bits of the software CPU's state the SDM leaves undefined, so that nobody compares them.

After MUL/IMUL (SF, ZF, AF, PF), DIV/IDIV (all six arithmetic flags), AND/OR/XOR/TEST (AF), shifts
(AF; OF unless the count is 1), rotates (OF unless the count is 1), BT* (OF, SF, AF, PF), BSF/BSR
(all but ZF), ... the SDM says a flag is *undefined*: each CPU model picks its own value (an AMD
family 25 leaves PF alone after MUL where an Intel family 6 model 207 computes it from the result),
and KVM's emulator runs these instructions natively (fastop), so the real /dev/kvm shows the host
CPU's choice at every ring.  The model cannot know it, so it tracks it instead:

- ``undef``: the RFLAGS bits left undefined by the instruction that last wrote them (iced-x86's
  per-instruction RFLAGS tables, which follow the SDM's "Flags Affected" sections; a shift or
  rotate by a count of 0 changes nothing, by 1 defines OF);
- the **images** of those flags: PUSHFQ and the RFLAGS slot of an exception frame put them in
  memory, POP / MOV carry them between memory and registers, POPFQ / IRETQ bring them back into
  RFLAGS.  ``mem`` (linear byte address -> undefined bits of that byte) and ``regs`` (GPR index ->
  undefined bits) say where they are now;
- ``uses``: instructions that consumed an undefined value in any other way (a Jcc/SETcc/ADC on an
  undefined flag, arithmetic on a register holding an undefined image).  From there on the model's
  results are a guess; the differential runner reports these instructions.

The differential runner masks the undefined bits out of both sides (registers, RFLAGS, memory)
before comparing, so the comparison is the same on every host (docs/real-kvm.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import iced_x86 as ix

if TYPE_CHECKING:
    from .x86cpu import X86Cpu

_RB = ix.RflagsBits
# iced's RflagsBits -> x86 RFLAGS bit positions (the six arithmetic flags)
_ICED_TO_X86 = tuple(
    (0x800 if i & _RB.OF else 0) | (0x80 if i & _RB.SF else 0) | (0x40 if i & _RB.ZF else 0)
    | (0x10 if i & _RB.AF else 0) | (0x1 if i & _RB.CF else 0) | (0x4 if i & _RB.PF else 0)
    for i in range(64))
_ARITH_ICED = _RB.OF | _RB.SF | _RB.ZF | _RB.AF | _RB.CF | _RB.PF
_ARITH_X86 = 0x8D5
OF_X86 = 0x800

_I = ix.Mnemonic
_A = ix.OpAccess
_READS = frozenset({_A.READ, _A.COND_READ, _A.READ_WRITE, _A.READ_COND_WRITE})
_WRITES = frozenset({_A.WRITE, _A.COND_WRITE, _A.READ_WRITE, _A.READ_COND_WRITE})
# Instructions that copy a value without computing on it: an undefined image moves with the data.
_MOVES = frozenset({_I.MOV, _I.PUSH, _I.POP})
# Bit-parallel logic: each result bit depends on the same bit of the inputs only, so undefined bits
# stay where they are (an OR with a 1 or an AND with a 0 defines them); SF, ZF, PF of the result
# then depend on them.
_BITWISE = frozenset({_I.AND, _I.OR, _I.XOR, _I.NOT})
_RESULT_FLAGS = 0x80 | 0x40 | 0x4
_SHIFTS = frozenset({_I.SHL, _I.SAL, _I.SHR, _I.SAR})
_ROTATES = frozenset({_I.ROL, _I.ROR, _I.RCL, _I.RCR})
_FROM_MEMORY = frozenset({_I.POPFQ, _I.POPF, _I.IRETQ})   # RFLAGS reloaded from a stored image


def _through_immediate(instr: ix.Instruction, bits: int) -> int:
    """The undefined bits left after AND/OR with an immediate (which defines some of them)."""
    if instr.op_count != 2 or instr.op1_kind == ix.OpKind.REGISTER or instr.op1_kind == ix.OpKind.MEMORY:
        return bits
    imm = instr.immediate(1) & ((1 << 64) - 1)
    if instr.mnemonic == _I.OR:
        return bits & ~imm
    if instr.mnemonic == _I.AND:
        return bits & imm
    return bits


def _x86(iced_bits: int) -> int:
    return _ICED_TO_X86[iced_bits & _ARITH_ICED]


class UndefinedFlags:
    """The tracker one X86Cpu owns (``cpu.undefined``); the CPU calls ``before``/``after`` around
    each instruction that retires and ``frame`` when it pushes an exception frame."""

    def __init__(self) -> None:
        self.undef = 0                        # RFLAGS bits (x86 positions) that are undefined now
        self.mem: dict[int, int] = {}         # linear byte address -> undefined bits of that byte
        self.regs: dict[int, int] = {}        # GPR index -> undefined bits of its 64-bit value
        self.uses: list[str] = []             # "rip=...: instruction: what" for each consumption
        self._factory = ix.InstructionInfoFactory()
        self._fmt = ix.Formatter(ix.FormatterSyntax.NASM)
        self._flags: tuple[int, int] | None = None
        self._image: int | None = None        # where POPFQ / IRETQ reads its RFLAGS image
        self._dst: tuple[list[tuple[int, int]], list[tuple[int, int, int]], int] | None = None

    # -- per instruction ------------------------------------------------------------------------
    def before(self, cpu: X86Cpu, instr: ix.Instruction) -> None:
        mn = instr.mnemonic
        self._flags = self._flag_effect(cpu, instr)
        self._image = None
        if mn in _FROM_MEMORY:
            self._image = (cpu.regs[4] + (16 if mn == _I.IRETQ else 0)) & ((1 << 64) - 1)
        elif self.undef and mn not in (_I.PUSHFQ, _I.PUSHF):
            read = _x86(instr.rflags_read) & self.undef
            if read:
                self._use(cpu, instr, f"reads undefined RFLAGS bits {read:#x}")
        self._dst = None
        if self.mem or self.regs:
            self._operands(cpu, instr)

    def _operands(self, cpu: X86Cpu, instr: ix.Instruction) -> None:
        """Find undefined images among the instruction's inputs: a move carries them to its
        destination, anything else consumes them (a use); remember the destinations to update."""
        from .x86cpu.constants import GPR_SLICES
        mn = instr.mnemonic
        move = mn in _MOVES or mn in _BITWISE
        info = self._factory.info(instr)
        carried = 0
        reg_dst: list[tuple[int, int, int]] = []
        for r in info.used_registers():
            gpr = GPR_SLICES.get(r.register)
            if gpr is None:
                continue
            idx, size, shift = gpr
            if idx == 4:
                continue                      # RSP: the stack pointer never holds a flags image
            if r.access in _READS and idx in self.regs:
                bits = (self.regs[idx] >> shift) & ((1 << (8 * size)) - 1)
                if bits and move and (r.access == _A.READ or mn in _BITWISE):
                    carried |= bits
                elif bits:
                    name = self._fmt.format_register(r.register)
                    self._use(cpu, instr, f"computes with an undefined RFLAGS image in {name}")
            if r.access in _WRITES:
                reg_dst.append((idx, size, shift))
        mem_dst: list[tuple[int, int]] = []
        for m in info.used_memory():
            addr = self._address(cpu, m)
            size = ix.MemorySizeExt.size(m.memory_size) or 1
            if m.access in _READS and mn not in _FROM_MEMORY:
                bits = self._mem_bits(addr, size)
                if bits and move:
                    carried |= bits
                elif bits:
                    self._use(cpu, instr, f"computes with an undefined RFLAGS image at {addr:#x}")
            if m.access in _WRITES:
                mem_dst.append((addr, size))
        if mn in _BITWISE and carried:
            carried = _through_immediate(instr, carried)
            if self._flags is not None:
                modified, undefined = self._flags
                self._flags = (modified, undefined | _RESULT_FLAGS)
        self._dst = (mem_dst, reg_dst, carried if move else 0)

    def after(self, cpu: X86Cpu, instr: ix.Instruction) -> None:
        if self._image is not None:
            self.undef = self._mem_bits(self._image, 8) & _ARITH_X86 if self.mem else 0
        elif self._flags is not None:
            modified, undefined = self._flags
            self.undef = (self.undef & ~modified) | undefined
        dst, self._dst = self._dst, None
        if dst is not None:
            mem_dst, reg_dst, carried = dst
            for addr, size in mem_dst:
                self._set_mem(addr, size, carried)
            for idx, size, shift in reg_dst:
                self._set_reg(idx, size, shift, carried)
        if instr.mnemonic in (_I.PUSHFQ, _I.PUSHF):
            self._set_mem(cpu.regs[4], -instr.stack_pointer_increment, self.undef)

    def frame(self, rsp: int, slots: int, rflags_slot: int) -> None:
        """An exception frame of ``slots`` qwords was pushed at ``rsp``: its RFLAGS qword holds the
        current undefined bits, the other qwords none."""
        for i in range(slots):
            self._set_mem(rsp + 8 * i, 8, self.undef if i == rflags_slot else 0)

    # -- helpers ----------------------------------------------------------------------------------
    def _flag_effect(self, cpu: X86Cpu, instr: ix.Instruction) -> tuple[int, int] | None:
        """(modified, undefined) RFLAGS bits in x86 positions, refined for shift/rotate counts."""
        modified = _x86(instr.rflags_modified)
        if not modified:
            return None
        undefined = _x86(instr.rflags_undefined)
        mn = instr.mnemonic
        if mn in _SHIFTS or mn in _ROTATES:
            count = self._count(cpu, instr)
            if count == 0:
                return None                                  # no flag changes (SDM)
            if count == 1:
                undefined &= ~OF_X86                         # OF is defined for a 1-bit count
        return modified, undefined

    @staticmethod
    def _count(cpu: X86Cpu, instr: ix.Instruction) -> int:
        size = cpu.op_size(instr, 0)
        if instr.op_count < 2:
            raw = 1
        elif instr.op1_kind == ix.OpKind.REGISTER:
            raw = cpu.regs[1] & 0xFF
        else:
            raw = instr.immediate(1)
        count = raw & (0x3F if size == 8 else 0x1F)
        if instr.mnemonic in (_I.RCL, _I.RCR) and size < 4:
            count %= 8 * size + 1
        return count

    @staticmethod
    def _address(cpu: X86Cpu, m: ix.UsedMemory) -> int:
        if m.base == ix.Register.RIP:
            return m.displacement & ((1 << 64) - 1)      # iced gives the absolute target
        addr = m.displacement
        if m.base != ix.Register.NONE:
            addr += cpu.get(m.base)
        if m.index != ix.Register.NONE:
            addr += cpu.get(m.index) * m.scale
        return addr & ((1 << 64) - 1)

    def _mem_bits(self, addr: int, size: int) -> int:
        out = 0
        for i in range(size):
            out |= self.mem.get((addr + i) & ((1 << 64) - 1), 0) << (8 * i)
        return out

    def _set_mem(self, addr: int, size: int, bits: int) -> None:
        if not (bits or self.mem):
            return
        for i in range(size):
            a = (addr + i) & ((1 << 64) - 1)
            b = (bits >> (8 * i)) & 0xFF
            if b:
                self.mem[a] = b
            else:
                self.mem.pop(a, None)

    def _set_reg(self, idx: int, size: int, shift: int, bits: int) -> None:
        old = self.regs.get(idx, 0)
        if size >= 4:
            new = bits & ((1 << (8 * size)) - 1)            # a 32-bit write zero-extends
        else:
            m = ((1 << (8 * size)) - 1) << shift               # shift: 8 for AH..BH
            new = (old & ~m) | ((bits << shift) & m)
        if new:
            self.regs[idx] = new
        else:
            self.regs.pop(idx, None)

    def _use(self, cpu: X86Cpu, instr: ix.Instruction, what: str) -> None:
        if len(self.uses) < 64:
            self.uses.append(f"rip={cpu.rip:#x} {cpu.text(instr)!r}: {what}")


__all__ = ["UndefinedFlags"]
