"""A long CPL0 loop: kvm_pvm emulates at most 1024 instructions per entry (pvm_emul_batch), so
`exits` grows by one per 1024 instructions (the real host adds timer-tick exits; the runner keeps
the smallest count of up to three runs).  At CPL3 the loop runs natively."""

from kvmmu.guest.runtime import Map, Program, both_rings

DATA = 0x60_0000

PROGRAMS = both_rings(Program(
    name="long_loop",
    doc="380 iterations of a 3-instruction RAM loop (one batch exit), a MMIO write, a shorter loop",
    maps=(Map(DATA, 0x1000, flags="rw u"), Map(0xD000_0000, 0x1000, flags="rw u")),
    data={DATA: bytes(64)},
    code=f"""
        mov rdi, {DATA:#x}
        mov ecx, 380
    l1: add [rdi], rcx
        dec ecx
        jnz l1
        mov rax, 0xd0000000
        mov [rax], ecx
        mov ecx, 100
    l2: add [rdi + 8], rcx
        loop l2
        hlt
    """))
