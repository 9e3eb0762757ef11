"""MMIO loops of every width: 24 writes then 24 reads of 1, 2, 4 and 8 bytes (CPL0 and CPL3).

Each write is one KVM_EXIT_MMIO of that length; each read returns the device's value, summed into
RAM so the final memory shows what the guest read.  At CPL3 every access is a #PF exit (no MMIO
sptes with mmio_caching=N) that KVM emulates; at CPL0 KVM's emulator exits without a #PF.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

MMIO = 0xD000_0000
DATA = 0x60_0000
REG = {1: "al", 2: "ax", 4: "eax", 8: "rax"}
SIZE = {1: "byte", 2: "word", 4: "dword", 8: "qword"}


def loop(width: int) -> Program:
    return Program(
        name=f"mmio_loop_{8 * width}",
        doc=f"{width}-byte MMIO writes then reads in a loop",
        maps=(Map(DATA, 0x1000, flags="rw u"), Map(MMIO, 0x1000, flags="rw u")),
        data={DATA: bytes(8)},
        code=f"""
            mov rdi, {MMIO:#x}
            xor ebx, ebx
            mov ecx, 24
        wr: mov eax, ecx
            imul eax, eax, 0x01010101
            mov {SIZE[width]} [rdi + rcx*{width}], {REG[width]}
            dec ecx
            jnz wr
            mov ecx, 24
        rd: mov {REG[width]}, {SIZE[width]} [rdi + 0x400 + rcx*{width}]
            add rbx, rax
            loop rd
            mov rsi, {DATA:#x}
            mov [rsi], rbx
            hlt
        """)


PROGRAMS = [p for w in (1, 2, 4, 8) for p in both_rings(loop(w))]
