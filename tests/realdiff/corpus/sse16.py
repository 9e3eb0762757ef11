"""16-byte SSE accesses (movdqu/movups/movaps): two 8-byte MMIO exits per access (one
mmio_exits), also across an MMIO page boundary and across RAM pages."""

from kvmmu.guest.runtime import Map, Program, both_rings

DATA = 0x60_0000
MMIO = 0xD000_0000

PROGRAMS = [
    *both_rings(Program(
        name="sse16_mmio",
        doc="movdqu/movups/movaps loads and stores on MMIO, aligned, unaligned and page-crossing",
        maps=(Map(DATA, 0x1000, flags="rw u"), Map(MMIO, 0x2000, flags="rw u")),
        data={DATA: bytes(range(64))},
        code=f"""
            mov rdi, {MMIO:#x}
            mov rsi, {DATA:#x}
            movdqu xmm0, [rsi]
            movdqu [rdi], xmm0
            movups xmm1, [rdi + 0x23]
            movaps [rdi + 0x40], xmm1
            movdqu [rdi + 0xff8], xmm1
            movdqu xmm2, [rdi + 0xffc]
            movdqu [rsi + 0x10], xmm1
            movdqu [rsi + 0x20], xmm2
            hlt
        """)),
    *both_rings(Program(
        name="sse16_ram",
        doc="movdqu across two RAM pages and movaps within one",
        maps=(Map(DATA, 0x3000, flags="rw u"),),
        data={DATA: bytes(range(256)) * 16, DATA + 0x1000: bytes(4096)},
        code=f"""
            mov rsi, {DATA:#x}
            movdqu xmm0, [rsi + 0x10]
            movdqu [rsi + 0xff8], xmm0
            movdqu xmm1, [rsi + 0xffc]
            movaps [rsi + 0x1100], xmm1
            movdqu xmm2, [rsi + 0x1ff9]
            movdqu [rsi + 0x1200], xmm2
            hlt
        """)),
]
