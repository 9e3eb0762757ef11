"""CR3 switches between two address spaces that map the same address to different pages; one
variant edits the PTE of the inactive space before switching to it."""

from kvmmu.guest.runtime import Map, Program, both_rings

VA = 0x70_0000
A, B, C = 0x64_0000, 0x64_1000, 0x64_2000
DATA = 0x60_0000
INIT = {DATA: bytes(64), A: b"\x0a" * 4096, B: b"\x0b" * 4096, C: b"\x0c" * 4096}
SWITCH = "mov eax, 2\n    svc"

PROGRAMS = [
    *both_rings(Program(
        name="cr3_switch",
        doc="read in space 0, switch to space 1, read and write, switch back, read",
        maps=(Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x1000, A, "rw u")),
        spaces=((Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x1000, B, "rw u")),),
        data=INIT,
        code=f"""
            mov rdx, {VA:#x}
            mov rbx, [rdx]
            mov rdi, CR3_1
            {SWITCH}
            mov rcx, [rdx]
            mov qword [rdx + 8], 0x1111
            mov rdi, CR3_0
            {SWITCH}
            mov r8, [rdx]
            mov r9, [rdx + 8]
            mov rsi, {DATA:#x}
            mov [rsi], rbx
            mov [rsi + 8], rcx
            mov [rsi + 16], r8
            mov [rsi + 24], r9
            hlt
        """)),
    *both_rings(Program(
        name="cr3_switch_inactive_edit",
        doc="edit the PTE of the inactive space, then switch to it (MOV CR3 resyncs)",
        maps=(Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x1000, A, "rw u")),
        spaces=((Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x1000, B, "rw u")),),
        data=INIT,
        code=f"""
            mov rdx, {VA:#x}
            mov rdi, CR3_1
            {SWITCH}
            mov rbx, [rdx]
            mov rdi, CR3_0
            {SWITCH}
            mov rdi, pte_in(1, {VA:#x})
            mov rsi, {C | 7:#x}
            mov eax, 3
            svc
            mov rdi, CR3_1
            {SWITCH}
            mov rcx, [rdx]
            mov rsi, {DATA:#x}
            mov [rsi], rbx
            mov [rsi + 8], rcx
            hlt
        """)),
]
