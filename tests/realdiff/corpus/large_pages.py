"""2 MiB pages: the PDE's A and D bits, and splitting a 2 MiB page into 4 KiB pages.

A read through a 2 MiB page sets A in the PDE (the leaf), a write sets D; accessed 4 KiB pieces far
apart show what KVM maps (a direct shadow page of 4 KiB sptes at CPL3).  Then the kernel replaces
the PDE with a page table (prepared in memory: the same frames, except that page 1 moves to another
frame and page 2 is not present) and INVLPGs: page 0 reads the same bytes, page 1 the new frame's,
page 2 faults, a write to page 3 sets that PTE's D bit.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

VA = 0xC0_0000
BIG = 0x20_0000                 # the 2 MiB page's frame
PT = 0x66_0000                  # the page table that splits it
MOVED = 0x67_0000
DATA = 0x60_0000


def _split_table() -> bytes:
    ptes = [(BIG + 0x1000 * i) | 0x7 for i in range(512)]
    ptes[1] = MOVED | 0x7
    ptes[2] = 0
    return b"".join(p.to_bytes(8, "little") for p in ptes)


PROGRAMS = [*both_rings(Program(
    name="large_page_ad_split",
    doc="read, then write through a 2 MiB page (PDE A, D); replace the PDE by a page table; INVLPG",
    maps=(Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x20_0000, BIG, "rw u 2m")),
    data={BIG: b"\x10" * 16, BIG + 0x1000: b"\x11" * 16, BIG + 0x3000: b"\x13" * 16,
          BIG + 0x1F_F000: b"\x1f" * 16, PT: _split_table(), MOVED: b"\x77" * 16},
    faults={"pf": "resume"},
    code=f"""
        mov r12, {DATA:#x}
        mov rdx, {VA:#x}
        mov rax, [rdx]
        mov [r12], rax
        mov rax, [rdx + 0x1ff000]
        mov [r12 + 8], rax
        mov qword [rdx + 0x3008], 0x33
        mov rdi, pde({VA:#x})
        mov rsi, {PT | 7:#x}
        mov eax, 3
        svc
        mov rdi, {VA:#x}
        mov eax, 1
        svc
        mov rdx, {VA:#x}
        mov rax, [rdx]
        mov [r12 + 16], rax
        mov rax, [rdx + 0x1000]
        mov [r12 + 24], rax
        mov qword [RT_FIXUP], f1
        mov rax, [rdx + 0x2000]
    f1: mov qword [rdx + 0x3000], 0x44
        mov rax, [rdx + 0x3008]
        mov [r12 + 32], rax
        hlt
    """)), *both_rings(Program(
    name="large_page_write_first",
    doc="a write as the first access to a 2 MiB page (A and D at once), then a write to a read-only "
        "2 MiB page (#PF with P|W, no D), resumed; a read of it sets A only",
    maps=(Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x20_0000, BIG, "rw u 2m"),
          Map(0xE0_0000, 0x20_0000, 0x40_0000, "u 2m")),
    faults={"pf": "resume"},
    code=f"""
        mov rdx, {VA + 0x12_3450:#x}
        mov dword [rdx], 0x600d
        mov rdx, 0xe01000
        mov qword [RT_FIXUP], f1
        mov byte [rdx], 1
    f1: mov rax, [rdx + 0x1000]
        mov [{DATA:#x}], rax
        hlt
    """))]
