"""A recursive (self-mapping) page table: PML4 slot 1 points at the PML4 itself.

Through the window at 0x8000000000 the guest reads its own PTE, PDE and PML4 entry, moves a
mapping by writing a PTE through the window (INVLPG, read back), and rewrites its PDE through the
window.  The PML4 page serves at several levels of one walk, so KVM shadows one guest page at
several levels.  At CPL3 the window's leaf for a PTE is the level-1 table, which goes unsync on the
native store; the leaf for a PDE is the page directory, which stays write-protected, so that store
is emulated (pf_emulate).  The walks' A/D bits land in table entries used as leaves.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

VA = 0x70_0000
A, B = 0x64_0000, 0x64_1000
DATA = 0x60_0000
R = 1                                   # the recursive PML4 slot
WIN = R << 39


def pte_via(v: int) -> int:
    return WIN | ((v >> 9) & ((1 << 39) - 8))


def pde_via(v: int) -> int:
    return WIN | (R << 30) | ((v >> 18) & ((1 << 30) - 8))


PML4E_SELF = WIN | (R << 30) | (R << 21) | (R << 12) | (R * 8)

PROGRAMS = both_rings(Program(
    name="recursive_page_table",
    doc="PML4[1] = the PML4: read PTE/PDE/PML4E through the window, move VA by a window store, INVLPG",
    maps=(Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x1000, A, "rw u")),
    data={A: b"\xaa" * 16, B: b"\xbb" * 16},
    symbols={"PTE_VIA": pte_via(VA), "PDE_VIA": pde_via(VA), "PML4E_SELF": PML4E_SELF},
    code=f"""
        mov rdx, {VA:#x}
        mov rbx, [rdx]
        mov rdi, CR3_0 + {8 * R}
        mov rsi, CR3_0 | 7
        mov eax, 3
        svc
        mov r12, {DATA:#x}
        mov rdx, PTE_VIA
        mov rax, [rdx]
        mov [r12], rax
        mov rdx, PDE_VIA
        mov rax, [rdx]
        mov [r12 + 8], rax
        mov rdx, PML4E_SELF
        mov rax, [rdx]
        mov [r12 + 16], rax
        mov rdx, PTE_VIA
        mov qword [rdx], {B | 7:#x}
        mov rdi, {VA:#x}
        mov eax, 1
        svc
        mov rdx, {VA:#x}
        mov rax, [rdx]
        mov [r12 + 24], rax
        mov [r12 + 32], rbx
        mov rdx, PDE_VIA
        mov rax, [rdx]
        or rax, 0x20
        mov [rdx], rax
        mov rdx, {VA:#x}
        mov rax, [rdx + 8]
        mov [r12 + 40], rax
        hlt
    """))
