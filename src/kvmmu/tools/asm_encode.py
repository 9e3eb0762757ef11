"""The assembler's encoder (asm.py): one parsed statement to bytes.  Every iced-x86 legacy form of the
mnemonic whose operand kinds fit is built and encoded; the shortest wins (as in NASM), and each
encoding is decoded back as a check."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import iced_x86 as ix

from .asm_syntax import Imm, Mem, Operand, Reg, Stmt, evaluate
from .asm_tables import (
    BRANCH_KINDS,
    FIXED_REG_KINDS,
    GPR_KINDS,
    IMM_KINDS,
    MEM_KINDS,
    REG_CLASS_KINDS,
    STRING_OPS,
    Form,
    K,
    R,
    code_index,
    far_codes,
    operand_bits,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from iced_x86._iced_x86_py import Code, OpCodeOperandKind


def fits(value: int, bits: int, signed: bool) -> bool:
    if signed:
        return -(1 << (bits - 1)) <= value < (1 << (bits - 1))
    return -(1 << (bits - 1)) <= value < (1 << bits)


def _opsize_for(ops: tuple[Operand, ...]) -> int:
    for op in ops:
        if isinstance(op, Reg) and op.cls in ("gpr", "xmm"):
            return op.size
    return 0


class Encoder:
    def __init__(self) -> None:
        self.enc = ix.Encoder(64)

    def length(self, instr: ix.Instruction, rip: int) -> bytes:
        try:
            self.enc.encode(instr, rip)
        except ValueError:
            self.enc.take_buffer()          # a failed encode may leave bytes behind
            raise
        data = bytes(self.enc.take_buffer())
        check = ix.Decoder(64, data, ip=rip).decode()
        if check.len != len(data) or check.code != instr.code:
            raise ValueError(f"iced round trip failed for {instr}: {data.hex()}")
        return data


def _mem_operand(m: Mem, symbols: Mapping[str, object]) -> ix.MemoryOperand:
    disp = evaluate(m.disp, symbols) if m.disp else 0
    if m.rel:
        return ix.MemoryOperand(R.RIP, displ=disp, displ_size=8)
    if m.base == R.NONE and m.index == R.NONE:
        if not fits(disp, 32, True):
            raise ValueError(f"absolute address {disp:#x} does not fit a sign-extended disp32; "
                             "use [rel label] or a register")
        return ix.MemoryOperand(displ=disp, displ_size=8)
    if not fits(disp, 32, True):
        raise ValueError(f"displacement {disp:#x} does not fit 32 bits")
    return ix.MemoryOperand(m.base, m.index, m.scale, disp, 1 if disp else 0)


def _candidates(stmt: Stmt) -> list[Form]:
    return [c for c in code_index().get(stmt.mnemonic, []) if len(c[1]) == len(stmt.operands)]


def _compatible(kinds: tuple[OpCodeOperandKind, ...], ops: tuple[Operand, ...], opsize: int) -> bool:
    for kind, op in zip(kinds, ops, strict=True):
        if isinstance(op, Reg):
            if kind in FIXED_REG_KINDS:
                if FIXED_REG_KINDS[kind] != op.reg:
                    return False
            elif kind not in (GPR_KINDS[op.size] if op.cls == "gpr" else REG_CLASS_KINDS.get(op.cls, ())):
                return False
        elif isinstance(op, Mem):
            if kind not in MEM_KINDS:
                return False
            want = MEM_KINDS[kind]
            size = op.size or opsize
            if want and size and size != want:
                return False
            if want and not size:
                return False
        else:
            if kind not in IMM_KINDS and kind not in BRANCH_KINDS:
                return False
    return True


def _immediate(kind: OpCodeOperandKind, value: int) -> int:
    """The value iced takes for an immediate of `kind`, checked to fit it."""
    bits, signed = IMM_KINDS[kind]
    if kind == K.IMM8_CONST_1:
        if value != 1:
            raise ValueError("this form takes the constant 1")
    elif bits == 64:
        if not fits(value, 64, False):
            raise ValueError(f"immediate {value:#x} does not fit 64 bits")
        value &= (1 << 64) - 1
    elif signed:
        v = value
        if v >= 1 << 63:
            v -= 1 << 64
        if not fits(v, bits, True):
            raise ValueError(f"immediate {value:#x} does not fit a sign-extended imm{bits}")
        value = v
    else:
        if not fits(value, bits, False):
            raise ValueError(f"immediate {value:#x} does not fit imm{bits}")
        value &= (1 << bits) - 1
        if value >= 1 << (bits - 1):        # iced takes the signed view of an imm8/16/32
            value -= 1 << bits
    return value


# Instruction.create_* by operand signature: r register, m memory, i imm32 (or narrower), q imm64.
_CREATE = {
    "": "create", "r": "create_reg", "m": "create_mem", "i": "create_i32", "rr": "create_reg_reg",
    "rm": "create_reg_mem", "mr": "create_mem_reg", "ri": "create_reg_i32", "rq": "create_reg_u64",
    "mi": "create_mem_i32", "rri": "create_reg_reg_i32", "rmi": "create_reg_mem_i32",
    "mri": "create_mem_reg_i32", "rrr": "create_reg_reg_reg", "ii": "create_i32_i32",
}


def _build(code: Code, kinds: tuple[OpCodeOperandKind, ...], ops: tuple[Operand, ...],
           symbols: Mapping[str, object]) -> ix.Instruction:
    args: list[object] = []
    sig = ""
    for kind, op in zip(kinds, ops, strict=True):
        if isinstance(op, Reg):
            args.append(op.reg)
            sig += "r"
        elif isinstance(op, Mem):
            args.append(_mem_operand(op, symbols))
            sig += "m"
        else:
            value = evaluate(op.expr, symbols)
            if kind in BRANCH_KINDS:
                return ix.Instruction.create_branch(code, value & 0xFFFFFFFFFFFFFFFF)
            args.append(_immediate(kind, value))
            sig += "i" if IMM_KINDS[kind][0] != 64 else "q"
    fn = _CREATE.get(sig)
    if fn is None:
        raise ValueError(f"operand combination {sig!r} is not supported")
    instr: ix.Instruction = getattr(ix.Instruction, fn)(code, *args)
    return instr


def _string_insn(stmt: Stmt) -> ix.Instruction:
    op, s = STRING_OPS[stmt.mnemonic]
    rep = [p for p in stmt.prefixes if p != "lock"]
    name = f"{op}{s}"
    if rep:
        kind = rep[0]
        if op in ("cmps", "scas"):
            name = f"{'repne' if kind in ('repne', 'repnz') else 'repe'}_{name}"
        else:
            name = f"rep_{name}"
    instr: ix.Instruction = getattr(ix.Instruction, f"create_{name}")(64)
    return instr


def encode_insn(stmt: Stmt, symbols: Mapping[str, object], rip: int, enc: Encoder,
                long_branches: bool) -> bytes:
    """The shortest encoding of an instruction statement at ``rip`` (``long_branches``: rel32 forms
    only, for the first layout pass).  An undefined symbol raises KeyError, a misfit ValueError."""
    if stmt.mnemonic in STRING_OPS and not stmt.operands:
        return enc.length(_string_insn(stmt), rip)
    cands = _candidates(stmt)
    if not cands:
        known = stmt.mnemonic in code_index()
        raise ValueError(f"no 64-bit form of {stmt.mnemonic!r} takes {len(stmt.operands)} operand(s)"
                         if known else f"unknown mnemonic {stmt.mnemonic!r}")
    ops = stmt.operands
    if stmt.mnemonic in ("call", "jmp") and len(ops) == 1 and isinstance(ops[0], Mem) and not ops[0].size:
        ops = (replace(ops[0], size=8),)     # as NASM in 64-bit mode: a near qword pointer (FF /2, /4)
    opsize = _opsize_for(ops)
    # With no operand saying the size, a 16-bit form (66 prefix) is a last resort, as in NASM:
    # ``push 200`` is 68 imm32 (a qword push), not 66 68 imm16.
    sized = bool(opsize) or any(isinstance(op, Mem | Imm) and op.size for op in ops)
    best: bytes | None = None
    best_rank = (True, 0)
    errors: list[str] = []
    for code, kinds in cands:
        if code in far_codes() or not _compatible(kinds, ops, opsize):
            continue
        imm_sizes = {op.size for op in ops if isinstance(op, Imm) and op.size}
        if imm_sizes and operand_bits(code) not in {8 * n for n in imm_sizes}:
            continue
        if any(k == K.BR64_1 for k in kinds) and long_branches and any(
                c[1] and c[1][0] == K.BR64_4 for c in cands):
            continue
        try:
            instr = _build(code, kinds, ops, symbols)
            if "lock" in stmt.prefixes:
                instr.has_lock_prefix = True
            if any(p in ("rep", "repe", "repz") for p in stmt.prefixes):
                instr.has_repe_prefix = True
            if any(p in ("repne", "repnz") for p in stmt.prefixes):
                instr.has_repne_prefix = True
            data = enc.length(instr, rip)
        except KeyError:
            raise
        except ValueError as e:
            errors.append(str(e))
            continue
        rank = (not sized and operand_bits(code) == 16, len(data))
        if best is None or rank < best_rank:
            best, best_rank = data, rank
    if best is None and stmt.mnemonic in ("xchg", "test") and len(stmt.operands) == 2 and not errors:
        swapped = Stmt(stmt.line_no, stmt.line, "insn", stmt.mnemonic, stmt.prefixes, stmt.operands[::-1])
        return encode_insn(swapped, symbols, rip, enc, long_branches)
    if best is None:
        detail = errors[0] if errors else "operand kinds/sizes match no encoding " \
            "(give a memory operand a size: byte/word/dword/qword)"
        raise ValueError(detail)
    return best


def encode_data(s: Stmt, symbols: Mapping[str, object], first: bool) -> bytes:
    """A db/dw/dd/dq statement's bytes (on the ``first`` pass an undefined symbol counts as 0)."""
    out = bytearray()
    width = s.data_width
    for item in s.data_items:
        if item[:1] in "\"'" and item[-1:] == item[:1] and len(item) >= 2:
            if width != 1:
                raise ValueError("strings are only allowed in db")
            out += item[1:-1].encode("latin-1")
            continue
        try:
            value = evaluate(item, symbols)
        except KeyError:
            if not first:
                raise
            value = 0
        if not -(1 << (8 * width - 1)) <= value < 1 << (8 * width):
            raise ValueError(f"{value:#x} does not fit {width} byte(s)")
        out += (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return bytes(out)
