"""Partial PTE writes: 1-, 2- and 4-byte stores into a PTE, each followed by INVLPG and an access.

The stores go through a user alias of the level-1 table.  At CPL0 they are KVM-emulated writes to a
write-tracked table (``kvm_mmu_track_write`` with 1, 2 or 4 bytes: a byte store at a PTE's first
byte updates that gpte, a 2-byte store is "misaligned" and zaps the shadow page, a 4-byte store is
widened to the aligned 8-byte gpte); at CPL3 they are native stores into an unsync table, picked up
by INVLPG.  Effects: clear RW (a write #PF), move the frame (bits 12-23), set NX through the upper
dword (a fetch #PF), clear P.
"""

import sys
from pathlib import Path

from kvmmu.guest.runtime import Map, Program, both_rings

if (_here := str(Path(__file__).parent)) not in sys.path:
    sys.path.append(_here)          # corpus files are loaded by path: _snippets.py is beside this one
from _snippets import invlpg  # noqa: E402

VA = 0x70_0000
A, B = 0x64_0000, 0x64_1000
ALIAS = 0x7F_0000
DATA = 0x60_0000
INVLPG = invlpg(VA)
PTE = f"{ALIAS:#x} + (pte({VA:#x}) & 0xfff)"

PROGRAMS = both_rings(Program(
    name="pte_partial_writes",
    doc="byte store clears RW, word store moves the frame, dword store sets NX, byte store clears P",
    maps=(Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x1000, A, "rw u"), Map(ALIAS, 0x1000, f"pt:{VA:#x}", "rw u")),
    data={A: b"\xc3" + b"\xaa" * 4095, B: b"\xc3" + b"\xbb" * 4095},
    nx=True, faults={"pf": "resume"},
    code=f"""
        mov r12, {DATA:#x}
        mov r13, {PTE}
        mov rdx, {VA:#x}
        mov rax, [rdx]
        mov [r12], rax
        mov byte [r13], 0x25          ; P|US|A: RW cleared
        {INVLPG}
        mov rdx, {VA:#x}
        mov qword [RT_FIXUP], f1
        mov byte [rdx + 8], 1
    f1: mov byte [r13], 0x27
        mov word [r13 + 1], 0x6410    ; frame A -> B
        {INVLPG}
        mov rdx, {VA:#x}
        mov rax, [rdx + 8]
        mov [r12 + 8], rax
        call rdx
        mov dword [r13 + 4], 0x80000000
        {INVLPG}
        mov rdx, {VA:#x}
        mov qword [RT_FIXUP], f2
        call rdx
    f2: mov rax, [rdx + 16]
        mov [r12 + 16], rax
        mov byte [r13], 0
        {INVLPG}
        mov rdx, {VA:#x}
        mov qword [RT_FIXUP], f3
        mov rax, [rdx]
    f3: mov rax, [r13]
        mov [r12 + 24], rax
        hlt
    """))

# The kernel half: a #DE (div r8 with r8 = 0) whose handler stores the low `esi` bytes of rcx at
# [rdi] and resumes at the fixup, so CPL3 code can have the kernel make a 1/2/4-byte store.
KERNEL_STORE = """
    cmp esi, 2
    je de_word
    cmp esi, 4
    je de_dword
    mov [rdi], cl
    jmp rt_resume
de_word:
    mov [rdi], cx
    jmp rt_resume
de_dword:
    mov [rdi], ecx
    jmp rt_resume"""


def _kstore(label: str, offset: int, size: int, value: int) -> str:
    return (f"mov qword [RT_FIXUP], {label}\n    mov rdi, pte({VA:#x}) + {offset}\n    mov esi, {size}\n"
            f"    mov ecx, {value:#x}\n    div r8\n{label}:")


PROGRAMS += both_rings(Program(
    name="pte_partial_kernel_writes",
    doc="the same edits made by kernel stores (KVM-emulated, write-tracked) while the PTE is shadowed, "
        "without INVLPG",
    maps=(Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x1000, A, "rw u")),
    data={A: b"\xc3" + b"\xaa" * 4095, B: b"\xc3" + b"\xbb" * 4095},
    nx=True, faults={"de": KERNEL_STORE, "pf": "resume"},
    code=f"""
        xor r8d, r8d
        mov r12, {DATA:#x}
        mov rdx, {VA:#x}
        mov rax, [rdx]
        mov byte [rdx + 8], 2
        mov [r12], rax
        {_kstore("k1", 0, 1, 0x25)}
        mov rdx, {VA:#x}
        mov qword [RT_FIXUP], f1
        mov byte [rdx + 8], 1
    f1: {_kstore("k2", 0, 1, 0x27)}
        {_kstore("k3", 1, 2, 0x6410)}
        mov rdx, {VA:#x}
        mov rax, [rdx + 8]
        mov [r12 + 8], rax
        call rdx
        {_kstore("k4", 4, 4, 0x80000000)}
        mov rdx, {VA:#x}
        mov qword [RT_FIXUP], f2
        call rdx
    f2: mov rax, [rdx + 16]
        mov [r12 + 16], rax
        {_kstore("k5", 0, 1, 0)}
        mov rdx, {VA:#x}
        mov qword [RT_FIXUP], f3
        mov rax, [rdx]
    f3: mov [r12 + 24], rax
        hlt
    """))
