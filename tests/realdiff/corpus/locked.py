"""Locked read-modify-write instructions on RAM, MMIO and across boundaries.

On RAM a locked instruction is an ordinary read-modify-write (at CPL3: one write fault sets D and
maps the page writable).  On MMIO each is a read exit, then a write exit.  A locked access that
crosses a page boundary (a split lock) is split per page like any other: across RAM/MMIO only the
MMIO piece exits.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

DATA = 0x60_0000
MMIO = 0xD000_0000
MAPS = (Map(DATA, 0x2000, flags="rw u"), Map(MMIO, 0x1000, flags="rw u"),
        Map(0x70_0000, 0x1000, 0x64_0000, "rw u"), Map(0x70_1000, 0x1000, MMIO + 0x1000, "rw u"))
BODY = """
    lock add dword [rdi], 3
    lock xadd [rdi + 8], rcx
    xchg [rdi + 0x10], rdx          ; xchg with memory is locked without the prefix
    mov eax, 0x11
    mov ebx, 0x22
    lock cmpxchg [rdi + 0x18], ebx
    mov eax, [rdi + 0x18]
    lock cmpxchg [rdi + 0x18], ebx
    lock inc qword [rdi + 0x20]
    lock bts dword [rdi + 0x28], 5
    lock sub word [rdi + 0x2e], 1
    lock neg byte [rdi + 0x30]
"""

PROGRAMS = [
    *both_rings(Program(
        name="locked_ram", doc="lock add/xadd/xchg/cmpxchg (miss then hit)/inc/bts/sub/neg on a RAM page "
                               "not touched before",
        maps=MAPS, data={DATA + 0x1000: bytes(range(64))},
        code=f"mov rdi, {DATA + 0x1000:#x}\nmov ecx, 7\nmov rdx, 0x99\n{BODY}\n"
             f"mov rsi, {DATA:#x}\nmov [rsi], rax\nmov [rsi + 8], rcx\nmov [rsi + 16], rdx\n"
             "pushfq\npop qword [rsi + 24]\nhlt")),
    *both_rings(Program(
        name="locked_mmio", doc="the same instructions on MMIO: a read exit and a write exit each",
        maps=MAPS, data={DATA: bytes(64)},
        code=f"mov rdi, {MMIO:#x}\nmov ecx, 7\nmov rdx, 0x99\n{BODY}\n"
             f"mov rsi, {DATA:#x}\nmov [rsi], rax\nmov [rsi + 8], rcx\nmov [rsi + 16], rdx\nhlt")),
    *both_rings(Program(
        name="locked_split", doc="split locks: across two RAM pages, and across RAM into MMIO",
        maps=MAPS, data={DATA: b"\x01" * 0x2000, 0x64_0000: b"\x02" * 0x1000},
        code=f"""
            mov rdi, {DATA + 0xffc:#x}
            lock add qword [rdi], 0x101
            mov rcx, 0x55
            lock xadd [rdi + 2], rcx
            mov rdi, 0x700ffe
            lock add dword [rdi], 0x10
            mov eax, 1
            lock xchg [rdi - 2], rax
            mov rsi, {DATA:#x}
            mov [rsi], rcx
            mov [rsi + 8], rax
            hlt""")),
]
