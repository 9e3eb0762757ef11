"""REP string instructions against MMIO.

KVM's emulator returns to the guest without advancing RIP after each iteration that writes MMIO,
so at CPL3 every such iteration is a fresh #PF (and at CPL0 a fresh decode); MMIO reads continue
inside one emulation.  After the last iteration the emulator re-enters the guest once more (it
tests RCX == 0 only when an iteration starts), which costs CPL0 one more decode.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

DATA = 0x60_0000
MMIO = 0xD000_0000
MAPS = (Map(DATA, 0x2000, flags="rw u"), Map(MMIO, 0x2000, flags="rw u"))
INIT = {DATA: bytes(range(1, 129)) * 32}

PROGRAMS = [
    *both_rings(Program(
        name="rep_movs_to_mmio",
        doc="rep movsb/movsw/movsd/movsq from RAM to MMIO",
        maps=MAPS, data=INIT,
        code=f"""
            mov rsi, {DATA:#x}
            mov rdi, {MMIO:#x}
            mov ecx, 5
            rep movsb
            mov ecx, 3
            rep movsw
            mov ecx, 2
            rep movsd
            mov ecx, 2
            rep movsq
            movsq
            hlt
        """)),
    *both_rings(Program(
        name="rep_movs_from_mmio",
        doc="rep movsb/movsq and rep lodsd from MMIO into RAM",
        maps=MAPS, data=INIT,
        code=f"""
            mov rsi, {MMIO:#x}
            mov rdi, {DATA + 0x1000:#x}
            mov ecx, 6
            rep movsb
            mov ecx, 3
            rep movsq
            mov ecx, 2
            rep lodsd
            mov [rdi], rax
            hlt
        """)),
    *both_rings(Program(
        name="rep_stos_mmio_backwards",
        doc="std; rep stosd/stosq down through MMIO and RAM; cld",
        maps=MAPS, data=INIT,
        code=f"""
            mov rdi, {MMIO + 0x40:#x}
            mov eax, 0xa5a5a5a5
            mov ecx, 4
            std
            rep stosd
            mov rdi, {DATA + 0x1100:#x}
            mov rax, 0x0123456789abcdef
            mov ecx, 3
            rep stosq
            cld
            mov rdi, {DATA + 0x1200:#x}
            mov ecx, 40
            rep stosb
            hlt
        """)),
]
