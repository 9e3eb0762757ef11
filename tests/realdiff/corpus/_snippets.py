"""Guest-code pieces the corpus programs share (the corpus loader skips files named with a leading
underscore, so this one is no corpus file of its own).

The runtime's service call ``svc`` (kvmmu.guest.runtime) does, at CPL0 and from either ring, what a
CPL3 program cannot: rax = 1 INVLPG [rdi], 2 MOV CR3 rdi, 3 a kernel store of rsi to the qword at rdi
(how a program edits its own page-table entries).  ``results`` stores registers to consecutive
qwords of a data page, where the real-diff compares the two backends' memory.

Corpus files are loaded by path, not as a package: each one that uses these puts its own folder on
sys.path first (see pte_edits.py).
"""

from __future__ import annotations


def _operand(value: int | str) -> str:
    return f"{value:#x}" if isinstance(value, int) else value


def invlpg(gva: int | str) -> str:
    """svc 1: INVLPG of ``gva``."""
    return f"mov rdi, {_operand(gva)}\n    mov eax, 1\n    svc"


def load_cr3(cr3: str) -> str:
    """svc 2: MOV CR3 of ``cr3`` (e.g. ``CR3_1``, the second address space)."""
    return f"mov rdi, {cr3}\n    mov eax, 2\n    svc"


def kernel_store(addr: int | str, value: int | str) -> str:
    """svc 3: a CPL0 store of the qword ``value`` to ``addr`` (e.g. ``pte(0x700000)``)."""
    return f"mov rdi, {_operand(addr)}\n    mov rsi, {_operand(value)}\n    mov eax, 3\n    svc"


def results(base: int, *regs: str) -> str:
    """Store ``regs`` to the qwords at ``base``, ``base + 8``, ... (through rsi)."""
    stores = [f"mov [rsi{f' + {8 * i}' if i else ''}], {reg}" for i, reg in enumerate(regs)]
    return "\n    ".join([f"mov rsi, {base:#x}", *stores])
