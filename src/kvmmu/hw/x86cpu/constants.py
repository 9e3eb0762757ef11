"""The software CPU's architectural constants: operand widths, RFLAGS bits, exception vectors,
control-register bits, and where each general-purpose register name lives in the 16 GPRs."""

from __future__ import annotations

from typing import cast

import iced_x86 as ix

_R = ix.Register


M8, M16, M32, M64 = 0xFF, 0xFFFF, 0xFFFFFFFF, (1 << 64) - 1
MASKS = {1: M8, 2: M16, 4: M32, 8: M64, 16: (1 << 128) - 1}
SIGN = {1: 0x80, 2: 0x8000, 4: 0x80000000, 8: 1 << 63}

CF, PF, AF, ZF, SF, TF, IF, DF, OF, NT, RF, AC = (
    0x1, 0x4, 0x10, 0x40, 0x80, 0x100, 0x200, 0x400, 0x800, 0x4000, 0x10000, 0x40000)
ARITH_FLAGS = CF | PF | AF | ZF | SF | OF
RFLAGS_FIXED = 0x2

DE, DB, BP, UD, NM, DF_VEC, TS, NP, SS_VEC, GP, PF_VEC = 0, 1, 3, 6, 7, 8, 10, 11, 12, 13, 14

CR0_TS, CR0_EM, CR0_PG, CR0_NW_CD = 1 << 3, 1 << 2, 1 << 31, 1 << 30
CR4_PAE, CR4_OSFXSR, CR4_LA57, CR4_SMAP = 1 << 5, 1 << 9, 1 << 12, 1 << 21


def is_canonical(addr: int) -> bool:
    """Bits 63:47 all equal: canonical for 48-bit linear addresses (MOV to CR4 never sets LA57 here)."""
    top = addr >> 47
    return top == 0 or top == 0x1FFFF


def _gpr_table() -> dict[int, tuple[int, int, int]]:
    out: dict[int, tuple[int, int, int]] = {}
    for name, member in vars(_R).items():
        if name.startswith("_") or not isinstance(member, int) or member == _R.NONE:
            continue
        reg = cast("ix.Register_", member)   # the module's int members are its Register values
        if not ix.RegisterExt.is_gpr(reg):
            continue
        full = ix.RegisterExt.full_register(reg)
        shift = 8 if reg in (_R.AH, _R.CH, _R.DH, _R.BH) else 0
        out[reg] = (full - _R.RAX, ix.RegisterExt.size(reg), shift)
    return out


# Each GPR operand iced-x86 names (AL, AH, AX, EAX, RAX, R8B, ...): (index of its 64-bit register in
# X86Cpu.regs, width in bytes, bit shift: 8 for AH/CH/DH/BH).
GPR_SLICES = _gpr_table()
RSP = 4
RCX, RSI, RDI, RAX, RDX = 1, 6, 7, 0, 2
