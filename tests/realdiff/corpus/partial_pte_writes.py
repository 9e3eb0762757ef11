"""Emulated stores that write part of a PTE, or parts of two (kvm_mmu_track_write).

At CPL3 the reads run natively on KVM's shadow sptes; the store is made by the CPL0 #BP handler
(``int3`` at CPL3 reaches it), so KVM's emulator performs it and tracks it.  KVM widens a 4-byte
write of a PAE vCPU to the aligned 8-byte gpte (mmu_pte_write_fetch_gpte) before it checks for a
misaligned write: a dword over bytes 6..9 of a PTE passes as a write of the first PTE, whose spte is
zapped, while the second PTE's spte keeps the old frame through INVLPG and a CR3 reload (the page is
synced, so neither resyncs it).  A 2-byte store is "misaligned" and zaps the whole shadow page.
At CPL0 every access is emulated and walks the guest tables: the new PTEs are seen at once.
"""

import sys
from pathlib import Path

from kvmmu.guest.runtime import Map, Program

if (_here := str(Path(__file__).parent)) not in sys.path:
    sys.path.append(_here)          # corpus files are loaded by path: _snippets.py is beside this one
from _snippets import invlpg, load_cr3, results  # noqa: E402

VA1, VA2 = 0x70_0000, 0x70_1000
A, B, C = 0x64_0000, 0x64_1000, 0x64_2000
DATA = 0x60_0000
MAPS = (Map(DATA, 0x1000, flags="rw u"), Map(VA1, 0x1000, A, "rw u"), Map(VA2, 0x1000, B, "rw u"))
INIT = {DATA: bytes(64), A: b"\xaa" * 8, B: b"\xbb" * 8, C: b"\xcc" * 8}
INVLPG2 = invlpg(VA2)
RELOAD = load_cr3("CR3_0")


def partial(name: str, doc: str, offset: int, store: str, value: int) -> list[Program]:
    """Read both pages, store `value` with `store` at pte(VA1) + offset, then read VA2 after nothing,
    INVLPG and MOV CR3, and VA1 last."""
    def body(do_store: str) -> str:
        return f"""
        mov rdx, {VA1:#x}
        mov rbx, [rdx]
        mov rdx, {VA2:#x}
        mov rbx, [rdx]
        mov rdi, pte({VA1:#x}) + {offset}
        mov esi, {value:#x}
        {do_store}
        mov rdx, {VA2:#x}
        mov rcx, [rdx]
        {INVLPG2}
        mov rdx, {VA2:#x}
        mov r8, [rdx]
        {RELOAD}
        mov rdx, {VA2:#x}
        mov r9, [rdx]
        mov rdx, {VA1:#x}
        mov r10, [rdx]
        {results(DATA, "rcx", "r8", "r9", "r10")}
        hlt
    """
    return [
        Program(name=f"{name}_cpl0", cpl=0, doc=doc, maps=MAPS, data=INIT, code=body(store)),
        Program(name=f"{name}_cpl3", cpl=3, doc=doc, maps=MAPS, data=INIT,
                faults={"bp": f"{store}\n    jmp rt_iret"}, code=body("int3")),
    ]


PROGRAMS = [
    # Bytes 6..9: the top of PTE(VA1) stays 0, the low 16 bits of PTE(VA2) become C's frame | P RW US A.
    *partial("pte_straddle_dword", "a dword store over bytes 6..9 of a PTE moves the next PTE to C",
             6, "mov [rdi], esi", ((C | 0x27) & 0xFFFF) << 16),
    # Bytes 8..9 alone: a 2-byte write is misaligned for KVM too, the shadow page is zapped.
    *partial("pte_word_store", "a word store moves PTE(VA2) to C", 8, "mov [rdi], si", (C | 0x27) & 0xFFFF),
    # Bytes 8..11 (an aligned dword inside PTE(VA2)): widened to PTE(VA2) itself, zapped.
    *partial("pte_low_dword", "an aligned dword store moves PTE(VA2) to C", 8, "mov [rdi], esi", C | 0x27),
]
