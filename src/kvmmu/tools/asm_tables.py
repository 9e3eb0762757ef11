"""What the assembler (asm.py) knows of x86-64 through iced-x86: register names, operand kinds, the
mnemonic spellings it accepts, and every 64-bit legacy encoding indexed by mnemonic."""

from __future__ import annotations

from functools import cache, lru_cache
from typing import TYPE_CHECKING

import iced_x86 as ix

if TYPE_CHECKING:
    from iced_x86._iced_x86_py import Code, OpCodeOperandKind, Register

K = ix.OpCodeOperandKind
R = ix.Register

# iced's register numbering: each class is one contiguous run (first, last, class, size in bytes).
_REG_RUNS = (
    (R.AL, R.R15L, "gpr", 1), (R.AX, R.R15W, "gpr", 2), (R.EAX, R.R15D, "gpr", 4), (R.RAX, R.R15, "gpr", 8),
    (R.CR0, R.CR15, "cr", 8), (R.XMM0, R.XMM15, "xmm", 16), (R.ES, R.GS, "seg", 2),
)


def _reg_table() -> dict[str, tuple[Register, str, int]]:
    """name -> (iced register, class, size in bytes)."""
    out: dict[str, tuple[Register, str, int]] = {}
    value: Register
    for name, value in vars(R).items():
        if name.startswith("_") or not isinstance(value, int) or value == R.RIP:
            continue
        for first, last, cls, size in _REG_RUNS:
            if first <= value <= last:
                out[name.lower()] = (value, cls, size)
                break
    for i in range(8, 16):
        out[f"r{i}b"] = out[f"r{i}l"]
    return out


REGS = _reg_table()
SIZES = {"byte": 1, "word": 2, "dword": 4, "qword": 8, "oword": 16, "xmmword": 16}

# The operand kinds a register of a class (a GPR: of a size) can fill; AL, CL, DX... are FIXED_REG_KINDS.
GPR_KINDS = {
    1: (K.R8_REG, K.R8_OPCODE, K.R8_OR_MEM),
    2: (K.R16_REG, K.R16_OPCODE, K.R16_OR_MEM, K.R16_RM),
    4: (K.R32_REG, K.R32_OPCODE, K.R32_OR_MEM, K.R32_RM),
    8: (K.R64_REG, K.R64_OPCODE, K.R64_OR_MEM, K.R64_RM),
}
REG_CLASS_KINDS = {"cr": (K.CR_REG,), "xmm": (K.XMM_REG, K.XMM_OR_MEM, K.XMM_RM), "seg": (K.SEG_REG,)}
FIXED_REG_KINDS = {K.AL: R.AL, K.CL: R.CL, K.AX: R.AX, K.DX: R.DX, K.EAX: R.EAX, K.RAX: R.RAX}
MEM_KINDS = {K.R8_OR_MEM: 1, K.R16_OR_MEM: 2, K.R32_OR_MEM: 4, K.R64_OR_MEM: 8, K.XMM_OR_MEM: 16, K.MEM: 0}
# immediate kind -> (bits, signed-extension?)
IMM_KINDS = {K.IMM8: (8, False), K.IMM16: (16, False), K.IMM32: (32, False),
             K.IMM64: (64, False), K.IMM8SEX16: (8, True), K.IMM8SEX32: (8, True),
             K.IMM8SEX64: (8, True), K.IMM32SEX64: (32, True), K.IMM8_CONST_1: (0, False)}
BRANCH_KINDS = (K.BR64_1, K.BR64_4)

STRING_OPS = {
    f"{op}{s}": (op, s) for op in ("movs", "stos", "lods", "scas", "cmps") for s in "bwdq"
}
PREFIXES = ("rep", "repe", "repz", "repne", "repnz", "lock")
CC_ALIASES = {"jc": "jb", "jnae": "jb", "jnb": "jae", "jnc": "jae", "jz": "je", "jnz": "jne",
              "jna": "jbe", "jnbe": "ja", "jpe": "jp", "jpo": "jnp", "jnge": "jl", "jnl": "jge",
              "jng": "jle", "jnle": "jg", "loopz": "loope", "loopnz": "loopne",
              "cmovz": "cmove", "cmovnz": "cmovne", "setz": "sete", "setnz": "setne",
              "cmovc": "cmovb", "cmovnc": "cmovae", "setc": "setb", "setnc": "setae",
              # NASM, 64-bit mode: PUSHF/POPF default to the 64-bit form, the W forms take 66
              # (iced names the 66 9C / 66 9D forms pushf / popf)
              "pushf": "pushfq", "popf": "popfq", "pushfw": "pushf", "popfw": "popf"}

Form = tuple["Code", tuple["OpCodeOperandKind", ...]]        # an encoding and its operand kinds


@lru_cache(maxsize=1)
def code_index() -> dict[str, list[Form]]:
    """mnemonic -> [(code, operand kinds)] for every 64-bit legacy encoding iced knows."""
    mnemonics = {v: k.lower() for k, v in vars(ix.Mnemonic).items()
                 if not k.startswith("_") and isinstance(v, int)}
    index: dict[str, list[Form]] = {}
    code: Code
    for name, code in vars(ix.Code).items():
        if name.startswith("_") or not isinstance(code, int) or code == ix.Code.INVALID:
            continue
        info = ix.OpCodeInfo(code)
        if info.encoding != ix.EncodingKind.LEGACY or not info.mode64 or not info.is_instruction:
            continue
        kinds = tuple(info.op_kind(i) for i in range(info.op_count))
        index.setdefault(mnemonics.get(info.mnemonic, ""), []).append((code, kinds))
    return index


@cache
def operand_bits(code: Code) -> int:
    return int(ix.OpCodeInfo(code).operand_size)


@lru_cache(maxsize=1)
def far_codes() -> frozenset[Code]:
    """CALL/JMP m16:16/32/64 (FF /3, FF /5): far forms, which this assembler has no syntax for."""
    return frozenset(c for c, kinds in code_index().get("call", []) + code_index().get("jmp", [])
                     if kinds == (K.MEM,))
