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

Here: the layout passes (labels, ``org``, ``align``, branch relaxation) and the output.  The syntax is
parsed by asm_syntax.py, each statement encoded by asm_encode.py over the iced tables of asm_tables.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import iced_x86 as ix

from ..errors import KvmmuError
from .asm_encode import Encoder, encode_data, encode_insn
from .asm_syntax import AsmError, evaluate, parse

__all__ = ["AsmError", "Assembled", "assemble", "disassemble", "evaluate"]


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


def assemble(source: str, base: int = 0, symbols: dict[str, int] | None = None) -> Assembled:
    """Assemble ``source`` at ``base``; returns segments, labels (+ constants) and a listing."""
    stmts, consts = parse(source)
    syms_in = dict(symbols or {})
    labels_names = [s.name for s in stmts if s.kind == "label"]
    seen: set[str] = set()
    for s in stmts:
        if s.kind == "label":
            if s.name in seen or s.name in syms_in or s.name in consts:
                raise AsmError(s.line_no, s.line, f"label {s.name!r} is defined twice")
            seen.add(s.name)
    enc = Encoder()
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
                    data = encode_data(s, known, first)
                    listing.append((pc, data, s.line.strip()))
                    buf += data
                    continue
                try:
                    data = encode_insn(s, known, pc, enc, long_branches=first)
                except KeyError as e:
                    if not first:
                        raise AsmError(s.line_no, s.line, f"undefined symbol {e.args[0]!r}") from None
                    # first pass: assume the longest form; a placeholder far away forces it
                    data = encode_insn(s, _FarSymbols(known, pc), pc, enc, long_branches=True)
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


# -- disassembly (for listings and error messages) -------------------------------------------------
def disassemble(data: bytes, ip: int = 0) -> list[tuple[int, str]]:
    """(address, Intel-syntax text) for each instruction in ``data``."""
    dec = ix.Decoder(64, data, ip=ip)
    fmt = ix.Formatter(ix.FormatterSyntax.NASM)
    return [(instr.ip, fmt.format(instr)) for instr in dec]
