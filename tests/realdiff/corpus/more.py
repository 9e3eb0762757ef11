"""More shapes of the same mechanisms: MMIO behind a 2 MiB guest page, a stack in MMIO, PTE writes
that flood a shadowed table, a PTE edited through an alias then made visible by a CR3 reload, a
write through an alias of an upper-level (write-tracked) table, 16-byte accesses across a RAM /
read-only-slot boundary, unaligned MMIO, arithmetic flags — and instruction fetch from MMIO, which
KVM's emulator cannot do (KVM_EXIT_INTERNAL_ERROR at both rings on this host)."""

from kvmmu.guest.runtime import Map, Program, Slot, both_rings

MMIO = 0xD000_0000
DATA = 0x60_0000
ALU = [
    "mov eax, 3\nmov ecx, 5\nmul ecx", "mov rax, -1\nmov rcx, 2\nmul rcx", "mov rax, -3\nmov rcx, 5\nimul rcx",
    "mov eax, 100\nxor edx, edx\nmov ecx, 7\ndiv ecx", "mov rax, -100\ncqo\nmov rcx, 7\nidiv rcx",
    "mov eax, 0x81\nshl eax, 3", "mov eax, -3\nsar eax, 1", "mov eax, 0x80000001\nrol eax, 4",
    "mov eax, 0x10000\nimul eax, eax", "mov eax, 5\nbt eax, 2\nbts eax, 4", "xor eax, eax\nneg eax",
    "stc\nmov eax, 5\nadc eax, 3\nsbb ecx, 1", "mov al, 0x7f\nadd al, 1", "mov ax, 0\nsub ax, 1",
]

PROGRAMS = [
    *both_rings(Program(
        name="mmio_via_2m_page", doc="MMIO behind a 2 MiB guest page (a direct shadow page at CPL3)",
        maps=(Map(0xC0_0000, 0x20_0000, MMIO, "rw u 2m"),),
        code="mov rdi, 0xc00000\nmov dword [rdi + 0x1234], 5\nmov eax, [rdi + 0x1ff000]\nhlt")),
    *both_rings(Program(
        name="mmio_stack", doc="push/pop with RSP in MMIO: 8-byte write and read exits",
        maps=(Map(MMIO, 0x1000, flags="rw u"),),
        code="mov rbx, rsp\nmov rsp, 0xd0000100\npush rbx\npush 7\npop rcx\npop rsp\nhlt")),
    *both_rings(Program(
        name="pte_write_flood", doc="six kernel stores rewrite a PTE between reads (write-flooding)",
        maps=(Map(0x70_0000, 0x1000, 0x64_0000, "rw u"), Map(DATA, 0x1000, flags="rw u")),
        data={0x64_0000: b"\x0a" * 8, 0x64_1000: b"\x0b" * 8},
        code="""
            mov rdx, 0x700000
            mov ecx, 6
        l:  add rbx, [rdx]
            mov rdi, pte(0x700000)
            mov rsi, rcx
            and rsi, 1
            shl rsi, 12
            add rsi, 0x640007
            mov eax, 3
            push rcx
            svc
            pop rcx
            loop l
            add rbx, [rdx]
            mov [0x600000], rbx
            hlt""")),
    *both_rings(Program(
        name="pte_alias_edit_cr3_reload", doc="PTE rewritten through a user alias, then MOV CR3 (same value)",
        maps=(Map(0x70_0000, 0x1000, 0x64_0000, "rw u"), Map(0x7F_0000, 0x1000, "pt:0x700000", "rw u"),
              Map(DATA, 0x1000, flags="rw u")),
        data={0x64_0000: b"\x0a" * 8, 0x64_1000: b"\x0b" * 8},
        code="""
            mov rdx, 0x700000
            mov rbx, [rdx]
            mov rdi, 0x7f0000 + (pte(0x700000) & 0xfff)
            mov qword [rdi], 0x641007
            mov rcx, [rdx]
            mov rdi, CR3_0
            mov eax, 2
            svc
            mov r8, [rdx]
            mov rsi, 0x600000
            mov [rsi], rbx
            mov [rsi + 8], rcx
            mov [rsi + 16], r8
            hlt""")),
    *both_rings(Program(
        name="upper_table_alias_write", doc="a write through an alias of a page directory (write-tracked)",
        maps=(Map(0x70_0000, 0x1000, 0x64_0000, "rw u"), Map(0x7F_0000, 0x1000, "pt:0x700000", "rw u")),
        data={0x64_0000: b"\x0a" * 8},
        code="""
            mov rdx, 0x700000
            mov rbx, [rdx]
            mov rdi, 0x7f0000 + (pde(0x700000) & 0xfff)
            mov rax, [rdi]
            mov [rdi], rax
            mov rcx, [rdx]
            hlt""")),
    *both_rings(Program(
        name="sse16_ram_readonly_cross", doc="16-byte load and store across RAM and a read-only slot",
        slots=(Slot(0, 0, 8 << 20), Slot(1, 0x80_0000, 0x1000), Slot(2, 0x80_1000, 0x1000, 2)),
        maps=(Map(0x80_0000, 0x2000, flags="rw u"),),
        data={0x80_0000: b"\x11" * 4096, 0x80_1000: b"\x22" * 4096},
        code="mov rdi, 0x800ff8\nmovdqu xmm0, [rdi]\nmovdqu [rdi], xmm0\nhlt")),
    *both_rings(Program(
        name="mmio_unaligned", doc="odd-address 2-byte MMIO accesses, movzx/movsx loads",
        maps=(Map(MMIO, 0x1000, flags="rw u"), Map(DATA, 0x1000, flags="rw u")),
        code="""
            mov rdi, 0xd0000003
            mov word [rdi], 0x1234
            mov ax, [rdi + 2]
            movzx ecx, byte [rdi + 5]
            movsx rdx, word [rdi + 7]
            mov rsi, 0x600001
            mov [rsi], rcx
            mov [rsi + 9], rdx
            hlt""")),
    *both_rings(Program(
        name="alu_flags", doc="arithmetic results and RFLAGS (incl. undefined flags) stored to RAM",
        maps=(Map(DATA, 0x1000, flags="rw u"),),
        code="mov r15, 0x600000\n" + "\n".join(
            f"{body}\npushfq\npop r14\nmov [r15 + {16 * i}], r14\nmov [r15 + {16 * i + 8}], rax"
            for i, body in enumerate(ALU)) + "\nhlt")),
    Program(name="fetch_from_mmio_cpl0", cpl=0, doc="call into an MMIO page: KVM cannot fetch from MMIO",
            maps=(Map(MMIO, 0x1000, flags="rw u"),), code="mov rax, 0xd0000000\ncall rax\nhlt"),
    Program(name="fetch_from_mmio_cpl3", cpl=3, doc="call into an MMIO page: KVM cannot fetch from MMIO",
            maps=(Map(MMIO, 0x1000, flags="rw u"),), code="mov rax, 0xd0000000\ncall rax\nhlt"),
]
