"""The assembler's source syntax (asm.py): statements, operands and integer expressions, parsed into
`Stmt`s the encoder (asm_encode.py) turns into bytes."""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import KvmmuError
from .asm_tables import CC_ALIASES, PREFIXES, REGS, SIZES, R

if TYPE_CHECKING:
    from iced_x86._iced_x86_py import Register


class AsmError(KvmmuError):
    """The assembler could not make sense of a line; the message names the line and the rule."""

    def __init__(self, line_no: int, line: str, rule: str) -> None:
        self.line_no, self.line, self.rule = line_no, line, rule
        super().__init__(f"asm line {line_no}: {line.strip()!r}: {rule}")


# -- operands ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reg:
    reg: Register
    cls: str
    size: int


@dataclass(frozen=True)
class Mem:
    base: Register
    index: Register
    scale: int
    disp: str | None
    size: int          # 0 = unspecified
    rel: bool


@dataclass(frozen=True)
class Imm:
    expr: str
    size: int = 0      # ``push word 5``: the operand size a keyword asked for (0 = unspecified)


Operand = Reg | Mem | Imm


_EXPR_OPS: dict[type[ast.operator], Callable[[int, int], int]] = {
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
            return int(_EXPR_OPS[type(node.op)](ev(node.left), ev(node.right)))
        raise ValueError(f"unsupported expression element {ast.dump(node)[:40]}")
    return ev(tree)


_MEM_RE = re.compile(r"^(?:(byte|word|dword|qword|oword|xmmword)\s+(?:ptr\s+)?)?\[(.*)\]$", re.I)


def parse_operand(text: str, line_no: int, line: str) -> Operand:
    t = text.strip()
    low = t.lower()
    if low in REGS:
        reg, cls, size = REGS[low]
        return Reg(reg, cls, size)
    m = _MEM_RE.match(t)
    if m:
        size = SIZES[m.group(1).lower()] if m.group(1) else 0
        return _parse_mem(m.group(2), size, line_no, line)
    first, _, rest = t.partition(" ")
    if first.lower() in SIZES:
        if not rest.strip() or rest.strip().lower() in REGS:
            raise AsmError(line_no, line, f"a size keyword must be followed by a [memory] operand "
                           f"or an immediate: {t!r}")
        return Imm(rest.strip(), SIZES[first.lower()])
    return Imm(t)


def _address_terms(s: str) -> list[str]:
    """Split an address on its top-level + and -, each term keeping its sign."""
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
    return terms


def _address_reg(term: str) -> tuple[str, str] | None:
    """(register, scale text or "") if an address term is a register, ``reg*n`` or ``n*reg``."""
    left, star, right = term.partition("*")
    if left in REGS and REGS[left][1] == "gpr":
        return left, right
    if star and left and right in REGS:
        return right, left
    return None


def _parse_mem(inner: str, size: int, line_no: int, line: str) -> Mem:
    s = inner.strip()
    rel = False
    if s.lower().startswith("rel "):
        rel, s = True, s[4:].strip()
    base = index = R.NONE
    scale = 1
    disp_terms: list[str] = []
    for term in _address_terms(s):
        raw = term.strip()
        sign = ""
        body = raw
        if raw[0] in "+-":
            sign, body = (raw[0] if raw[0] == "-" else ""), raw[1:].strip()
        found = _address_reg(body.lower().replace(" ", ""))
        if found is None:
            disp_terms.append(f"{sign}({body})" if sign else f"({body})")
            continue
        name, mul = found
        reg, cls, rsize = REGS[name]
        if cls != "gpr" or rsize not in (4, 8) or sign:
            raise AsmError(line_no, line, f"address registers are 32/64-bit and added: {raw!r}")
        if mul:
            if index != R.NONE:
                raise AsmError(line_no, line, "only one scaled index register")
            index, scale = reg, int(mul, 0)
        elif base == R.NONE:
            base = reg
        elif index == R.NONE:
            index = reg
        else:
            raise AsmError(line_no, line, "at most a base and an index register")
    if scale not in (1, 2, 4, 8):
        raise AsmError(line_no, line, f"scale must be 1, 2, 4 or 8, not {scale}")
    if rel and (base != R.NONE or index != R.NONE):
        raise AsmError(line_no, line, "[rel x] takes no registers")
    disp = " + ".join(disp_terms) if disp_terms else None
    return Mem(base, index, scale, disp, size, rel)


def split_operands(text: str) -> list[str]:
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
class Stmt:
    line_no: int
    line: str
    kind: str                       # "insn", "data", "align", "org", "label"
    mnemonic: str = ""
    prefixes: tuple[str, ...] = ()
    operands: tuple[Operand, ...] = ()
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


def parse(source: str) -> tuple[list[Stmt], dict[str, str]]:
    """The statements of ``source`` and its ``equ`` constants (name -> expression)."""
    stmts: list[Stmt] = []
    consts: dict[str, str] = {}
    for line_no, raw in enumerate(source.splitlines(), 1):
        text = _strip_comment(raw).strip()
        while True:
            m = _LABEL_RE.match(text)
            if not m:
                break
            stmts.append(Stmt(line_no, raw, "label", name=m.group(1)))
            text = text[m.end():].strip()
        if not text:
            continue
        m = _EQU_RE.match(text)
        if m:
            consts[m.group(1)] = m.group(2).strip()
            continue
        stmts.extend(_parse_statement(text, line_no, raw))
    return stmts, consts


def _parse_statement(text: str, line_no: int, raw: str) -> list[Stmt]:
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
        items = tuple(split_operands(rest))
        if not items:
            raise AsmError(line_no, raw, f"{word} needs at least one value")
        return [Stmt(line_no, raw, "data", data_width=_DATA[word], data_items=items)]
    if word in ("align", "org"):
        if not rest:
            raise AsmError(line_no, raw, f"{word} needs a value")
        return [Stmt(line_no, raw, word, value=rest)]
    prefixes: list[str] = []
    while word in PREFIXES:
        prefixes.append(word)
        head, _, rest = rest.partition(" ")
        word, rest = head.lower(), rest.strip()
    word = CC_ALIASES.get(word, word)
    ops = tuple(parse_operand(o, line_no, raw) for o in split_operands(rest)) if rest else ()
    return [Stmt(line_no, raw, "insn", mnemonic=word, prefixes=tuple(prefixes), operands=ops)]
