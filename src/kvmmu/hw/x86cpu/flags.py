"""RFLAGS arithmetic of the software CPU: the status flags an ALU result sets, and the condition codes
that read them.  The flags the SDM leaves undefined are tracked apart (hw/undefined_flags.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import iced_x86 as ix

from .bus import UnsupportedInstruction
from .constants import AF, ARITH_FLAGS, CF, MASKS, OF, PF, SF, SIGN, ZF

_PARITY = bytes(1 if bin(i).count("1") % 2 == 0 else 0 for i in range(256))


class RflagsArithmetic:
    """The arithmetic flags an ALU result sets (SDM Vol. 1 3.4.3.1), and the conditions (Jcc, SETcc,
    CMOVcc) that read them: the part of X86Cpu that computes RFLAGS."""

    rflags: int
    rip: int

    if TYPE_CHECKING:
        def text(self, instr: ix.Instruction | None = None) -> str: ...   # X86Cpu

    def _szp(self, r: int, size: int) -> int:
        f = _PARITY[r & 0xFF] * PF
        if r == 0:
            f |= ZF
        if r & SIGN[size]:
            f |= SF
        return f

    def _set_flags(self, mask: int, value: int) -> None:
        self.rflags = (self.rflags & ~mask) | (value & mask)

    def flags_add(self, a: int, b: int, carry: int, size: int) -> int:
        m = MASKS[size]
        full = a + b + carry
        r = full & m
        f = self._szp(r, size)
        if full > m:
            f |= CF
        if (a ^ b ^ r) & 0x10:
            f |= AF
        if (~(a ^ b) & (a ^ r)) & SIGN[size]:
            f |= OF
        self._set_flags(ARITH_FLAGS, f)
        return r

    def flags_sub(self, a: int, b: int, borrow: int, size: int) -> int:
        m = MASKS[size]
        r = (a - b - borrow) & m
        f = self._szp(r, size)
        if a < b + borrow:
            f |= CF
        if (a ^ b ^ r) & 0x10:
            f |= AF
        if ((a ^ b) & (a ^ r)) & SIGN[size]:
            f |= OF
        self._set_flags(ARITH_FLAGS, f)
        return r

    def flags_logic(self, r: int, size: int) -> int:
        self._set_flags(ARITH_FLAGS, self._szp(r, size))
        return r

    def cond(self, cc: int) -> bool:
        f = self.rflags
        c = ix.ConditionCode
        if cc == c.O:
            return bool(f & OF)
        if cc == c.NO:
            return not f & OF
        if cc == c.B:
            return bool(f & CF)
        if cc == c.AE:
            return not f & CF
        if cc == c.E:
            return bool(f & ZF)
        if cc == c.NE:
            return not f & ZF
        if cc == c.BE:
            return bool(f & (CF | ZF))
        if cc == c.A:
            return not f & (CF | ZF)
        if cc == c.S:
            return bool(f & SF)
        if cc == c.NS:
            return not f & SF
        if cc == c.P:
            return bool(f & PF)
        if cc == c.NP:
            return not f & PF
        sf, of = bool(f & SF), bool(f & OF)
        if cc == c.L:
            return sf != of
        if cc == c.GE:
            return sf == of
        if cc == c.LE:
            return bool(f & ZF) or sf != of
        if cc == c.G:
            return not f & ZF and sf == of
        raise UnsupportedInstruction(self.rip, self.text(), f"condition {cc}")

