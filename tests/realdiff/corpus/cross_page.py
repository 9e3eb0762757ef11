"""Accesses that cross a page boundary: MMIO/MMIO (contiguous and scattered GPAs), RAM/MMIO in both
orders, and RAM/RAM with the second page not yet mapped by KVM.

KVM splits at the page boundary: one MMIO exit per page piece, the RAM part done directly.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

DATA = 0x60_0000

PROGRAMS = [
    *both_rings(Program(
        name="cross_mmio_mmio",
        doc="dword at +0xffe and qword at +0xffc across two MMIO pages, then across scattered GPAs",
        maps=(Map(DATA, 0x1000, flags="rw u"), Map(0xD000_0000, 0x2000, flags="rw u"),
              Map(0x70_0000, 0x1000, 0xD800_0000, "rw u"), Map(0x70_1000, 0x1000, 0xE000_0000, "rw u")),
        data={DATA: bytes(32)},
        code="""
            mov rdi, 0xd0000000
            mov dword [rdi + 0xffe], 0x11223344
            mov eax, [rdi + 0xffe]
            mov rbx, 0x5566778899aabbcc
            mov [rdi + 0xffc], rbx
            mov rbx, [rdi + 0xffc]
            mov rdi, 0x700000
            mov [rdi + 0xffa], rbx
            mov rcx, [rdi + 0xff9]
            mov word [rdi + 0xfff], 0x7788
            mov rsi, 0x600000
            mov [rsi], rax
            mov [rsi + 8], rbx
            mov [rsi + 16], rcx
            hlt
        """)),
    *both_rings(Program(
        name="cross_ram_mmio",
        doc="8-byte write and read across RAM->MMIO and MMIO->RAM page pairs",
        maps=(Map(DATA, 0x1000, flags="rw u"), Map(0x70_0000, 0x1000, 0x64_0000, "rw u"),
              Map(0x70_1000, 0x1000, 0xD000_0000, "rw u"), Map(0x70_2000, 0x1000, 0x64_1000, "rw u")),
        data={DATA: bytes(32), 0x64_0000: b"\x11" * 4096, 0x64_1000: b"\x22" * 4096},
        code="""
            mov rdi, 0x700000
            mov rax, 0x0102030405060708
            mov [rdi + 0xffc], rax
            mov rbx, [rdi + 0xffa]
            mov rcx, 0x1112131415161718
            mov [rdi + 0x1ffd], rcx
            mov rdx, [rdi + 0x1ffe]
            mov rsi, 0x600000
            mov [rsi], rbx
            mov [rsi + 8], rdx
            hlt
        """)),
    *both_rings(Program(
        name="cross_ram_ram",
        doc="qword write then read across two RAM pages KVM has not mapped yet",
        maps=(Map(DATA, 0x1000, flags="rw u"), Map(0x70_0000, 0x2000, 0x64_0000, "rw u")),
        data={DATA: bytes(32), 0x64_0000: bytes(4096), 0x64_1000: b"\x33" * 4096},
        code="""
            mov rdi, 0x700000
            mov rax, 0x8877665544332211
            mov [rdi + 0xffd], rax
            mov rbx, [rdi + 0xffb]
            mov ecx, [rdi + 0xffe]
            mov rsi, 0x600000
            mov [rsi], rbx
            mov [rsi + 8], rcx
            hlt
        """)),
]
