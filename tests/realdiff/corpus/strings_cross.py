"""String instructions across page boundaries and RAM/MMIO boundaries.

Each iteration is one element access; a REP run that walks from RAM into MMIO turns, at the first
MMIO element, into KVM's emulation (CPL3: a #PF; every following iteration that writes MMIO returns
to the guest and faults again), and one that walks from MMIO into RAM keeps the RAM part in the
emulator.  Elements that straddle a page boundary (movsd at +0xffe) are split per page.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

DATA = 0x60_0000
MMIO = 0xD000_0000
# RAM page, then MMIO page right after it (gva contiguous), then RAM again.
MAPS = (Map(DATA, 0x3000, flags="rw u"), Map(0x70_0000, 0x1000, 0x64_0000, "rw u"),
        Map(0x70_1000, 0x1000, MMIO, "rw u"), Map(0x70_2000, 0x1000, 0x64_1000, "rw u"))
INIT = {DATA: bytes(range(256)) * 48, 0x64_0000: b"\x33" * 4096, 0x64_1000: b"\x44" * 4096}

PROGRAMS = [
    *both_rings(Program(
        name="rep_movs_ram_page_cross", doc="rep movsq and movsb across RAM page boundaries (source and "
                                            "destination), then movsd elements straddling a boundary",
        maps=MAPS, data=INIT,
        code=f"""
            mov rsi, {DATA + 0xff0:#x}
            mov rdi, {DATA + 0x1ff8:#x}
            mov ecx, 4
            rep movsq
            mov rsi, {DATA + 0xffe:#x}
            mov rdi, {DATA + 0x2ffd:#x}
            mov ecx, 6
            rep movsb
            mov rsi, {DATA + 0x1ffe:#x}
            mov rdi, {DATA + 0x2ffe:#x}
            movsd
            hlt""")),
    *both_rings(Program(
        name="rep_stos_ram_into_mmio", doc="rep stosd from the end of a RAM page into the MMIO page after it",
        maps=MAPS, data=INIT,
        code="""
            mov rdi, 0x700ff8
            mov eax, 0x5a5a5a5a
            mov ecx, 4
            rep stosd
            hlt""")),
    *both_rings(Program(
        name="rep_movs_mmio_into_ram", doc="rep movsb whose source runs from MMIO into RAM, destination RAM",
        maps=MAPS, data=INIT,
        code=f"""
            mov rsi, 0x701ffd
            mov rdi, {DATA + 0x100:#x}
            mov ecx, 6
            rep movsb
            hlt""")),
    *both_rings(Program(
        name="rep_lods_cross", doc="rep lodsw from RAM across into MMIO, and a lodsq straddling RAM/MMIO",
        maps=MAPS, data=INIT,
        code=f"""
            mov rsi, 0x700ffc
            mov ecx, 4
            rep lodsw
            mov rbx, rax
            mov rsi, 0x700ffd
            lodsq
            mov rdi, {DATA:#x}
            mov [rdi], rax
            mov [rdi + 8], rbx
            mov [rdi + 16], rsi
            hlt""")),
    *both_rings(Program(
        name="movs_straddle_ram_mmio", doc="movsq whose destination straddles RAM and MMIO, and whose "
                                           "source straddles MMIO and RAM",
        maps=MAPS, data=INIT,
        code=f"""
            mov rsi, {DATA:#x}
            mov rdi, 0x700ffc
            movsq
            mov rsi, 0x701ffc
            mov rdi, {DATA + 0x200:#x}
            movsq
            std
            mov rsi, {DATA + 0x300:#x}
            mov rdi, 0x701002
            mov ecx, 3
            rep movsw
            cld
            hlt""")),
]
