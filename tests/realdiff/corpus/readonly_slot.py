"""A KVM_MEM_READONLY memslot: reads (also REP MOVS from it) come from memory, writes exit as MMIO
(is_write=1) and the memory stays unchanged; a read-modify-write reads memory and exits the write."""

from kvmmu.guest.runtime import Map, Program, Slot, both_rings

RO = 0x80_0000
DATA = 0x60_0000

PROGRAMS = both_rings(Program(
    name="readonly_slot",
    doc="read, write, RMW and rep movsq on a read-only slot",
    slots=(Slot(0, 0, 8 << 20), Slot(1, RO, 0x10000, flags=2)),
    maps=(Map(DATA, 0x1000, flags="rw u"), Map(RO, 0x2000, flags="rw u")),
    data={DATA: bytes(64), RO: bytes(range(256)) * 16, RO + 0x1000: b"\x5a" * 4096},
    code=f"""
        mov rsi, {RO:#x}
        mov rdi, {DATA:#x}
        mov rax, [rsi + 8]
        mov [rdi], rax
        mov dword [rsi + 0x10], 0xdeadbeef
        mov eax, [rsi + 0x10]
        mov [rdi + 8], rax
        add qword [rsi + 0x20], 7
        mov word [rsi + 0xfff], 0x4242
        lea rdi, [rdi + 16]
        mov ecx, 4
        rep movsq
        hlt
    """))
