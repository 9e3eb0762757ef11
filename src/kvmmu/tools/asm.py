"""A small Intel-syntax assembler for 64-bit test guests, encoding through iced-x86.

    image = assemble('''
        mov rdi, MMIO            ; symbols come from `symbols=` or from labels
        mov ecx, 16
    again:
        mov dword [rdi + rcx*4], ecx
        loop again
        hlt
    ''', base=0x20000, symbols={"MMIO": 0xD000_0000})
    image.segments            # [(address, bytes), ...]
    image.labels["again"]     # the address of a label

Syntax (NASM-like, one statement per line; ``;`` and ``#`` start comments):

- ``name:`` defines a label (an instruction may follow on the same line); ``NAME equ EXPR`` or
  ``NAME = EXPR`` defines a constant.
- Instructions: ``mnemonic op, op, ...`` with optional ``rep``/``repe``/``repne``/``lock`` prefixes.
  Operands are registers (``rax``, ``r9d``, ``al``, ``cr3``, ``xmm0``), immediates / expressions
  (``0x10``, ``LABEL + 8``, ``(1 << 12) | 3``, ``-1``), and memory ``[base + index*scale + disp]``,
  optionally sized (``byte``/``word``/``dword``/``qword``/``oword``/``xmmword`` [``ptr``]);
  ``[rel label]`` is RIP-relative.  Branches (``jmp``, ``jcc``, ``call``, ``loop``...) take a
  label or an address and are relaxed to the short form when the target is in range.  String
  instructions are written without operands (``rep movsq``, ``stosb``).
- Directives: ``db``/``dw``/``dd``/``dq`` (expressions; ``db`` also takes "strings"),
  ``times N <statement>``, ``align N``, ``org ADDR`` (starts a new segment at ADDR).

Every instruction is chosen among iced-x86's 64-bit legacy encodings by operand kinds; among the
encodings that fit, the shortest wins (as NASM does).  Errors raise ``AsmError`` naming the line.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache, lru_cache

import iced_x86 as ix

from ..errors import KvmmuError

__all__ = ["AsmError", "Assembled", "assemble", "disassemble"]


class AsmError(KvmmuError):
    """The assembler could not make sense of a line; the message names the line and the rule."""

    def __init__(self, line_no: int, line: str, rule: str) -> None:
        self.line_no, self.line, self.rule = line_no, line, rule
        super().__init__(f"asm line {line_no}: {line.strip()!r}: {rule}")


@dataclass
class Assembled:
    """The output: contiguous segments, the labels and constants, and a listing."""

    segments: list[tuple[int, bytes]]
    labels: dict[str, int]
    listing: list[tuple[int, bytes, str]] = field(default_factory=list)

    @property
    def base(self) -> int:
        return self.segments[0][0] if self.segments else 0

    @property
    def code(self) -> bytes:
        """The bytes of a single-segment image (raises if ``org`` made several)."""
        if len(self.segments) != 1:
            raise KvmmuError(f"the image has {len(self.segments)} segments; use .segments")
        return self.segments[0][1]

    def __getitem__(self, label: str) -> int:
        return self.labels[label]

    def end(self) -> int:
        """The first address after the last byte of the last segment."""
        addr, data = self.segments[-1]
        return addr + len(data)


# -- registers and operand kinds -----------------------------------------------------------------
_K = ix.OpCodeOperandKind
_R = ix.Register


def _reg_table() -> dict[str, tuple[int, str, int]]:
    """name -> (iced register, class, size in bytes)."""
    out: dict[str, tuple[int, str, int]] = {}
    for name, value in vars(_R).items():
        if name.startswith("_") or not isinstance(value, int):
            continue
        low = name.lower()
        if value == _R.RIP:
            continue
        if _R.AL <= value <= _R.R15L:
            out[low] = (value, "gpr", 1)
        elif _R.AX <= value <= _R.R15W:
            out[low] = (value, "gpr", 2)
        elif _R.EAX <= value <= _R.R15D:
            out[low] = (value, "gpr", 4)
        elif _R.RAX <= value <= _R.R15:
            out[low] = (value, "gpr", 8)
        elif _R.CR0 <= value <= _R.CR15:
            out[low] = (value, "cr", 8)
        elif _R.XMM0 <= value <= _R.XMM15:
            out[low] = (value, "xmm", 16)
        elif _R.ES <= value <= _R.GS:
            out[low] = (value, "seg", 2)
    for i in range(8, 16):
        out[f"r{i}b"] = out[f"r{i}l"]
    return out


_REGS = _reg_table()
_SIZES = {"byte": 1, "word": 2, "dword": 4, "qword": 8, "oword": 16, "xmmword": 16}

_GPR_KINDS = {
    1: (_K.R8_REG, _K.R8_OPCODE, _K.R8_OR_MEM),
    2: (_K.R16_REG, _K.R16_OPCODE, _K.R16_OR_MEM, _K.R16_RM),
    4: (_K.R32_REG, _K.R32_OPCODE, _K.R32_OR_MEM, _K.R32_RM),
    8: (_K.R64_REG, _K.R64_OPCODE, _K.R64_OR_MEM, _K.R64_RM),
}
_FIXED_REG_KINDS = {_K.AL: _R.AL, _K.CL: _R.CL, _K.AX: _R.AX, _K.DX: _R.DX, _K.EAX: _R.EAX,
                    _K.RAX: _R.RAX}
_MEM_KINDS = {_K.R8_OR_MEM: 1, _K.R16_OR_MEM: 2, _K.R32_OR_MEM: 4, _K.R64_OR_MEM: 8,
              _K.XMM_OR_MEM: 16, _K.MEM: 0}
# immediate kind -> (bits, signed-extension?)
_IMM_KINDS = {_K.IMM8: (8, False), _K.IMM16: (16, False), _K.IMM32: (32, False),
              _K.IMM64: (64, False), _K.IMM8SEX16: (8, True), _K.IMM8SEX32: (8, True),
              _K.IMM8SEX64: (8, True), _K.IMM32SEX64: (32, True), _K.IMM8_CONST_1: (0, False)}
_BRANCH_KINDS = (_K.BR64_1, _K.BR64_4)

_STRING_OPS = {
    f"{op}{s}": (op, s) for op in ("movs", "stos", "lods", "scas", "cmps") for s in "bwdq"
}
_PREFIXES = ("rep", "repe", "repz", "repne", "repnz", "lock")
_BRANCH_MNEMONICS = {"jmp", "call", "loop", "loope", "loopne", "loopz", "loopnz", "jrcxz",
                     "jecxz"} | {f"j{cc}" for cc in (
                         "o", "no", "b", "c", "nae", "ae", "nb", "nc", "e", "z", "ne", "nz", "be",
                         "na", "a", "nbe", "s", "ns", "p", "pe", "np", "po", "l", "nge", "ge",
                         "nl", "le", "ng", "g", "nle")}
_CC_ALIASES = {"jc": "jb", "jnae": "jb", "jnb": "jae", "jnc": "jae", "jz": "je", "jnz": "jne",
               "jna": "jbe", "jnbe": "ja", "jpe": "jp", "jpo": "jnp", "jnge": "jl", "jnl": "jge",
               "jng": "jle", "jnle": "jg", "loopz": "loope", "loopnz": "loopne",
               "cmovz": "cmove", "cmovnz": "cmovne", "setz": "sete", "setnz": "setne",
               "cmovc": "cmovb", "cmovnc": "cmovae", "setc": "setb", "setnc": "setae",
               # NASM, 64-bit mode: PUSHF/POPF default to the 64-bit form, the W forms take 66
               # (iced names the 66 9C / 66 9D forms pushf / popf)
               "pushf": "pushfq", "popf": "popfq", "pushfw": "pushf", "popfw": "popf"}


@lru_cache(maxsize=1)
def _code_index() -> dict[str, list[tuple[int, tuple[int, ...]]]]:
    """mnemonic -> [(code, operand kinds)] for every 64-bit legacy encoding iced knows."""
    mnemonics = {v: k.lower() for k, v in vars(ix.Mnemonic).items()
                 if not k.startswith("_") and isinstance(v, int)}
    index: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
    for name, code in vars(ix.Code).items():
        if name.startswith("_") or not isinstance(code, int) or code == ix.Code.INVALID:
            continue
        info = ix.OpCodeInfo(code)
        if info.encoding != ix.EncodingKind.LEGACY or not info.mode64 or not info.is_instruction:
            continue
        kinds = tuple(info.op_kind(i) for i in range(info.op_count))
        index.setdefault(mnemonics.get(info.mnemonic, ""), []).append((code, kinds))
    return index


# -- operands ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Reg:
    reg: int
    cls: str
    size: int


@dataclass(frozen=True)
class _Mem:
    base: int
    index: int
    scale: int
    disp: str | None
    size: int          # 0 = unspecified
    rel: bool


@dataclass(frozen=True)
class _Imm:
    expr: str
    size: int = 0      # ``push word 5``: the operand size a keyword asked for (0 = unspecified)


_Operand = _Reg | _Mem | _Imm


_EXPR_OPS: dict[type, object] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod, ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.BitOr: operator.or_,
    ast.BitAnd: operator.and_, ast.BitXor: operator.xor,
}


def evaluate(expr: str, symbols: Mapping[str, object]) -> int:
    """Evaluate an integer expression over symbols (+ - * // % << >> | & ^ ~, parentheses, and
    calls of functions given as symbols, e.g. ``pte(0x600000)``)."""
    tree = ast.parse(expr.strip(), mode="eval")

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) \
                and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in symbols:
                raise KeyError(node.id)
            value = symbols[node.id]
            if not isinstance(value, int):
                raise ValueError(f"{node.id} is a function; call it")
            return value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Invert)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else (~v if isinstance(node.op, ast.Invert)
                                                             else v)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            fn = symbols[node.func.id]
            if not callable(fn):
                raise ValueError(f"{node.func.id} is not a function")
            return int(fn(*(ev(a) for a in node.args)))
        if isinstance(node, ast.BinOp) and type(node.op) in _EXPR_OPS:
            fn = _EXPR_OPS[type(node.op)]
            return int(fn(ev(node.left), ev(node.right)))  # type: ignore[operator]
        raise ValueError(f"unsupported expression element {ast.dump(node)[:40]}")
    return ev(tree)


_MEM_RE = re.compile(r"^(?:(byte|word|dword|qword|oword|xmmword)\s+(?:ptr\s+)?)?\[(.*)\]$", re.I)


def _parse_operand(text: str, line_no: int, line: str) -> _Operand:
    t = text.strip()
    low = t.lower()
    if low in _REGS:
        reg, cls, size = _REGS[low]
        return _Reg(reg, cls, size)
    m = _MEM_RE.match(t)
    if m:
        size = _SIZES[m.group(1).lower()] if m.group(1) else 0
        return _parse_mem(m.group(2), size, line_no, line)
    first, _, rest = t.partition(" ")
    if first.lower() in _SIZES:
        if not rest.strip() or rest.strip().lower() in _REGS:
            raise AsmError(line_no, line, f"a size keyword must be followed by a [memory] operand "
                           f"or an immediate: {t!r}")
        return _Imm(rest.strip(), _SIZES[first.lower()])
    return _Imm(t)


def _parse_mem(inner: str, size: int, line_no: int, line: str) -> _Mem:
    s = inner.strip()
    rel = False
    if s.lower().startswith("rel "):
        rel, s = True, s[4:].strip()
    base = index = _R.NONE
    scale = 1
    disp_terms: list[str] = []
    # split on top-level + and - keeping the sign with the term
    terms: list[str] = []
    depth, cur = 0, ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch in "+-" and depth == 0 and cur.strip():
            terms.append(cur)
            cur = ch
        else:
            cur += ch
    if cur.strip():
        terms.append(cur)
    for term in terms:
        raw = term.strip()
        sign = ""
        body = raw
        if raw[0] in "+-":
            sign, body = (raw[0] if raw[0] == "-" else ""), raw[1:].strip()
        low = body.lower().replace(" ", "")
        reg_part, _, mul = low.partition("*")
        if reg_part in _REGS and _REGS[reg_part][1] == "gpr":
            reg, _cls, rsize = _REGS[reg_part]
            if rsize not in (4, 8) or sign:
                raise AsmError(line_no, line, f"address registers are 32/64-bit and added: {raw!r}")
            if mul:
                if index != _R.NONE:
                    raise AsmError(line_no, line, "only one scaled index register")
                index, scale = reg, int(mul, 0)
            elif base == _R.NONE:
                base = reg
            elif index == _R.NONE:
                index = reg
            else:
                raise AsmError(line_no, line, "at most a base and an index register")
            continue
        if "*" in low:
            a, _, b = low.partition("*")
            if b in _REGS:
                reg, _cls, _ = _REGS[b]
                if index != _R.NONE:
                    raise AsmError(line_no, line, "only one scaled index register")
                index, scale = reg, int(a, 0)
                continue
        disp_terms.append(f"{sign}({body})" if sign else f"({body})")
    if scale not in (1, 2, 4, 8):
        raise AsmError(line_no, line, f"scale must be 1, 2, 4 or 8, not {scale}")
    if rel and (base != _R.NONE or index != _R.NONE):
        raise AsmError(line_no, line, "[rel x] takes no registers")
    disp = " + ".join(disp_terms) if disp_terms else None
    return _Mem(base, index, scale, disp, size, rel)


def _split_operands(text: str) -> list[str]:
    out, depth, cur, quote = [], 0, "", ""
    for ch in text:
        if quote:
            cur += ch
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [o.strip() for o in out]


# -- statements ----------------------------------------------------------------------------------
@dataclass
class _Stmt:
    line_no: int
    line: str
    kind: str                       # "insn", "data", "align", "org", "label"
    mnemonic: str = ""
    prefixes: tuple[str, ...] = ()
    operands: tuple[_Operand, ...] = ()
    data_width: int = 0
    data_items: tuple[str, ...] = ()
    value: str = ""
    name: str = ""


_LABEL_RE = re.compile(r"^\s*([A-Za-z_.$][\w.$]*)\s*:(?!:)")
_EQU_RE = re.compile(r"^\s*([A-Za-z_][\w]*)\s+(?:equ\b|=)\s*(.+)$", re.I)
_DATA = {"db": 1, "dw": 2, "dd": 4, "dq": 8}


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in ";#":
            return line[:i]
    return line


def _parse(source: str) -> tuple[list[_Stmt], dict[str, str]]:
    stmts: list[_Stmt] = []
    consts: dict[str, str] = {}
    for line_no, raw in enumerate(source.splitlines(), 1):
        text = _strip_comment(raw).strip()
        while True:
            m = _LABEL_RE.match(text)
            if not m:
                break
            stmts.append(_Stmt(line_no, raw, "label", name=m.group(1)))
            text = text[m.end():].strip()
        if not text:
            continue
        m = _EQU_RE.match(text)
        if m:
            consts[m.group(1)] = m.group(2).strip()
            continue
        stmts.extend(_parse_statement(text, line_no, raw))
    return stmts, consts


def _parse_statement(text: str, line_no: int, raw: str) -> list[_Stmt]:
    head, _, rest = text.partition(" ")
    word = head.lower()
    rest = rest.strip()
    if word == "times":
        count_text, _, stmt = rest.partition(" ")
        try:
            count = int(evaluate(count_text, {}))
        except (KeyError, ValueError, SyntaxError) as e:
            raise AsmError(line_no, raw, f"times needs a constant count: {e}") from None
        one = _parse_statement(stmt.strip(), line_no, raw)
        return one * count
    if word in _DATA:
        items = tuple(_split_operands(rest))
        if not items:
            raise AsmError(line_no, raw, f"{word} needs at least one value")
        return [_Stmt(line_no, raw, "data", data_width=_DATA[word], data_items=items)]
    if word in ("align", "org"):
        if not rest:
            raise AsmError(line_no, raw, f"{word} needs a value")
        return [_Stmt(line_no, raw, word, value=rest)]
    prefixes: list[str] = []
    while word in _PREFIXES:
        prefixes.append(word)
        head, _, rest = rest.partition(" ")
        word, rest = head.lower(), rest.strip()
    word = _CC_ALIASES.get(word, word)
    ops = tuple(_parse_operand(o, line_no, raw) for o in _split_operands(rest)) if rest else ()
    return [_Stmt(line_no, raw, "insn", mnemonic=word, prefixes=tuple(prefixes), operands=ops)]


# -- encoding ------------------------------------------------------------------------------------
class _Unresolved(Exception):
    pass


def _fits(value: int, bits: int, signed: bool) -> bool:
    if signed:
        return -(1 << (bits - 1)) <= value < (1 << (bits - 1))
    return -(1 << (bits - 1)) <= value < (1 << bits)


def _opsize_for(ops: tuple[_Operand, ...]) -> int:
    for op in ops:
        if isinstance(op, _Reg) and op.cls in ("gpr", "xmm"):
            return op.size
    return 0


class _Encoder:
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


def _mem_operand(m: _Mem, symbols: dict[str, int], rip_hint: int) -> ix.MemoryOperand:
    disp = evaluate(m.disp, symbols) if m.disp else 0
    if m.rel:
        return ix.MemoryOperand(_R.RIP, displ=disp, displ_size=8)
    if m.base == _R.NONE and m.index == _R.NONE:
        if not _fits(disp, 32, True):
            raise ValueError(f"absolute address {disp:#x} does not fit a sign-extended disp32; "
                             "use [rel label] or a register")
        return ix.MemoryOperand(displ=disp, displ_size=8)
    if not _fits(disp, 32, True):
        raise ValueError(f"displacement {disp:#x} does not fit 32 bits")
    return ix.MemoryOperand(m.base, m.index, m.scale, disp, 1 if disp else 0)


def _candidates(stmt: _Stmt) -> list[tuple[int, tuple[int, ...]]]:
    return [c for c in _code_index().get(stmt.mnemonic, []) if len(c[1]) == len(stmt.operands)]


def _compatible(kinds: tuple[int, ...], ops: tuple[_Operand, ...], opsize: int) -> bool:
    for kind, op in zip(kinds, ops, strict=True):
        if isinstance(op, _Reg):
            if kind in _FIXED_REG_KINDS:
                if _FIXED_REG_KINDS[kind] != op.reg:
                    return False
            elif op.cls == "gpr":
                if kind not in _GPR_KINDS[op.size]:
                    return False
            elif op.cls == "cr":
                if kind != _K.CR_REG:
                    return False
            elif op.cls == "xmm":
                if kind not in (_K.XMM_REG, _K.XMM_OR_MEM, _K.XMM_RM):
                    return False
            elif op.cls == "seg":
                if kind != _K.SEG_REG:
                    return False
            else:
                return False
        elif isinstance(op, _Mem):
            if kind not in _MEM_KINDS:
                return False
            want = _MEM_KINDS[kind]
            size = op.size or opsize
            if want and size and size != want:
                return False
            if want and not size:
                return False
        else:
            if kind not in _IMM_KINDS and kind not in _BRANCH_KINDS:
                return False
    return True


@cache
def _operand_bits(code: int) -> int:
    return int(ix.OpCodeInfo(code).operand_size)


@lru_cache(maxsize=1)
def _far_codes() -> frozenset[int]:
    """CALL/JMP m16:16/32/64 (FF /3, FF /5): far forms, which this assembler has no syntax for."""
    return frozenset(c for c, kinds in _code_index().get("call", []) + _code_index().get("jmp", [])
                     if kinds == (_K.MEM,))


def _build(code: int, kinds: tuple[int, ...], ops: tuple[_Operand, ...], symbols: dict[str, int],
           rip: int) -> ix.Instruction:
    args: list[object] = []
    sig = ""
    for kind, op in zip(kinds, ops, strict=True):
        if isinstance(op, _Reg):
            args.append(op.reg)
            sig += "r"
        elif isinstance(op, _Mem):
            args.append(_mem_operand(op, symbols, rip))
            sig += "m"
        else:
            value = evaluate(op.expr, symbols)
            if kind in _BRANCH_KINDS:
                return ix.Instruction.create_branch(code, value & 0xFFFFFFFFFFFFFFFF)
            bits, signed = _IMM_KINDS[kind]
            if kind == _K.IMM8_CONST_1:
                if value != 1:
                    raise ValueError("this form takes the constant 1")
            elif bits == 64:
                if not _fits(value, 64, False):
                    raise ValueError(f"immediate {value:#x} does not fit 64 bits")
                value &= (1 << 64) - 1
            elif signed:
                v = value
                if v >= 1 << 63:
                    v -= 1 << 64
                if not _fits(v, bits, True):
                    raise ValueError(f"immediate {value:#x} does not fit a sign-extended imm{bits}")
                value = v
            else:
                if not _fits(value, bits, False):
                    raise ValueError(f"immediate {value:#x} does not fit imm{bits}")
                value &= (1 << bits) - 1
                if value >= 1 << (bits - 1):        # iced takes the signed view of an imm8/16/32
                    value -= 1 << bits
            args.append(value)
            sig += "i" if bits != 64 else "q"
    fn = {
        "": "create", "r": "create_reg", "m": "create_mem", "i": "create_i32", "rr": "create_reg_reg",
        "rm": "create_reg_mem", "mr": "create_mem_reg", "ri": "create_reg_i32", "rq": "create_reg_u64",
        "mi": "create_mem_i32", "rri": "create_reg_reg_i32", "rmi": "create_reg_mem_i32",
        "mri": "create_mem_reg_i32", "rrr": "create_reg_reg_reg", "ii": "create_i32_i32",
    }.get(sig)
    if fn is None:
        raise ValueError(f"operand combination {sig!r} is not supported")
    return getattr(ix.Instruction, fn)(code, *args)


def _string_insn(stmt: _Stmt) -> ix.Instruction:
    op, s = _STRING_OPS[stmt.mnemonic]
    rep = [p for p in stmt.prefixes if p != "lock"]
    if not rep:
        return getattr(ix.Instruction, f"create_{op}{s}")(64)
    kind = rep[0]
    if op in ("cmps", "scas"):
        name = "repne" if kind in ("repne", "repnz") else "repe"
        return getattr(ix.Instruction, f"create_{name}_{op}{s}")(64)
    return getattr(ix.Instruction, f"create_rep_{op}{s}")(64)


def _encode_insn(stmt: _Stmt, symbols: dict[str, int], rip: int, enc: _Encoder,
                 long_branches: bool) -> tuple[bytes, str]:
    if stmt.mnemonic in _STRING_OPS and not stmt.operands:
        instr = _string_insn(stmt)
        return enc.length(instr, rip), stmt.mnemonic
    cands = _candidates(stmt)
    if not cands:
        known = stmt.mnemonic in _code_index()
        raise ValueError(f"no 64-bit form of {stmt.mnemonic!r} takes {len(stmt.operands)} operand(s)"
                         if known else f"unknown mnemonic {stmt.mnemonic!r}")
    ops = stmt.operands
    if stmt.mnemonic in ("call", "jmp") and len(ops) == 1 and isinstance(ops[0], _Mem) and not ops[0].size:
        ops = (replace(ops[0], size=8),)     # as NASM in 64-bit mode: a near qword pointer (FF /2, /4)
    opsize = _opsize_for(ops)
    # With no operand saying the size, a 16-bit form (66 prefix) is a last resort, as in NASM:
    # ``push 200`` is 68 imm32 (a qword push), not 66 68 imm16.
    sized = bool(opsize) or any(isinstance(op, _Mem | _Imm) and op.size for op in ops)
    best: bytes | None = None
    best_rank = (True, 0)
    errors: list[str] = []
    for code, kinds in cands:
        if code in _far_codes() or not _compatible(kinds, ops, opsize):
            continue
        imm_sizes = {op.size for op in ops if isinstance(op, _Imm) and op.size}
        if imm_sizes and _operand_bits(code) not in {8 * n for n in imm_sizes}:
            continue
        if any(k == _K.BR64_1 for k in kinds) and long_branches and any(
                c[1] and c[1][0] == _K.BR64_4 for c in cands):
            continue
        try:
            instr = _build(code, kinds, ops, symbols, rip)
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
        rank = (not sized and _operand_bits(code) == 16, len(data))
        if best is None or rank < best_rank:
            best, best_rank = data, rank
    if best is None and stmt.mnemonic in ("xchg", "test") and len(stmt.operands) == 2 and not errors:
        swapped = _Stmt(stmt.line_no, stmt.line, "insn", stmt.mnemonic, stmt.prefixes, stmt.operands[::-1])
        return _encode_insn(swapped, symbols, rip, enc, long_branches)
    if best is None:
        detail = errors[0] if errors else "operand kinds/sizes match no encoding " \
            "(give a memory operand a size: byte/word/dword/qword)"
        raise ValueError(detail)
    return best, stmt.mnemonic


def assemble(source: str, base: int = 0, symbols: dict[str, int] | None = None) -> Assembled:
    """Assemble ``source`` at ``base``; returns segments, labels (+ constants) and a listing."""
    stmts, consts = _parse(source)
    syms_in = dict(symbols or {})
    labels_names = [s.name for s in stmts if s.kind == "label"]
    seen: set[str] = set()
    for s in stmts:
        if s.kind == "label":
            if s.name in seen or s.name in syms_in or s.name in consts:
                raise AsmError(s.line_no, s.line, f"label {s.name!r} is defined twice")
            seen.add(s.name)
    enc = _Encoder()
    labels: dict[str, int] = {}
    prev: dict[str, int] | None = None
    for attempt in range(24):
        first = attempt == 0
        symtab = dict(syms_in)
        symtab.update({n: v for n, v in labels.items()})
        known = dict(symtab)
        for name, expr in consts.items():
            try:
                known[name] = evaluate(expr, known)
            except KeyError:
                if not first:
                    raise AsmError(0, f"{name} equ {expr}", "constant uses an undefined symbol") from None
            except (ValueError, SyntaxError) as e:
                raise AsmError(0, f"{name} equ {expr}", str(e)) from None
        new_labels: dict[str, int] = {}
        segments: list[tuple[int, bytearray]] = [(base, bytearray())]
        listing: list[tuple[int, bytes, str]] = []
        for s in stmts:
            seg_base, buf = segments[-1]
            pc = seg_base + len(buf)
            if s.kind == "label":
                new_labels[s.name] = pc
                known[s.name] = labels.get(s.name, pc) if not first else pc
                continue
            try:
                if s.kind == "org":
                    addr = evaluate(s.value, known)
                    if buf:
                        segments.append((addr, bytearray()))
                    else:
                        segments[-1] = (addr, buf)
                    continue
                if s.kind == "align":
                    n = evaluate(s.value, known)
                    if n <= 0 or n & (n - 1):
                        raise ValueError("align takes a power of two")
                    pad = (-pc) % n
                    buf += bytes(pad)
                    continue
                if s.kind == "data":
                    data = _encode_data(s, known, first)
                    listing.append((pc, data, s.line.strip()))
                    buf += data
                    continue
                try:
                    data, _ = _encode_insn(s, known, pc, enc, long_branches=first)
                except KeyError as e:
                    if not first:
                        raise AsmError(s.line_no, s.line, f"undefined symbol {e.args[0]!r}") from None
                    # first pass: assume the longest form; a placeholder far away forces it
                    data, _ = _encode_insn(s, _FarSymbols(known, pc), pc, enc, long_branches=True)
            except AsmError:
                raise
            except (ValueError, SyntaxError, TypeError) as e:
                raise AsmError(s.line_no, s.line, str(e)) from None
            listing.append((pc, data, s.line.strip()))
            buf += data
        if not first and new_labels == prev:
            missing = [n for n in labels_names if n not in new_labels]
            assert not missing
            out = dict(known)
            out.update(new_labels)
            return Assembled([(a, bytes(b)) for a, b in segments if b or len(segments) == 1],
                             out, listing)
        prev = labels = new_labels
    raise AsmError(0, "", "layout did not converge (branch relaxation / align oscillates)")


class _FarSymbols(dict):
    """First-pass symbol table: unknown names resolve to an address far from every branch."""

    def __init__(self, known: dict[str, int], pc: int) -> None:
        super().__init__(known)
        self.pc = pc

    def __contains__(self, key: object) -> bool:
        return True

    def __missing__(self, key: str) -> int:
        return 0x7FFF0000


def _encode_data(s: _Stmt, symbols: dict[str, int], first: bool) -> bytes:
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


# -- disassembly (for listings and error messages) -------------------------------------------------
def disassemble(data: bytes, ip: int = 0) -> list[tuple[int, str]]:
    """(address, Intel-syntax text) for each instruction in ``data``."""
    dec = ix.Decoder(64, data, ip=ip)
    fmt = ix.Formatter(ix.FormatterSyntax.NASM)
    return [(instr.ip, fmt.format(instr)) for instr in dec]
