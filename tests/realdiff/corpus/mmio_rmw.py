"""Read-modify-write instructions on MMIO: each is a read exit then a write exit.

mmio_exits counts both (one per x86_emulate_instruction that needs userspace); at CPL0 the write
is completed inside KVM_RUN, so `exits` counts one entry per instruction; at CPL3 one #PF each.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

MMIO = 0xD000_0000

PROGRAMS = both_rings(Program(
    name="mmio_rmw",
    doc="add/or/inc/xchg/xadd/cmpxchg/neg on MMIO",
    maps=(Map(0x60_0000, 0x1000, flags="rw u"), Map(MMIO, 0x1000, flags="rw u")),
    data={0x60_0000: bytes(64)},
    code=f"""
        mov rdi, {MMIO:#x}
        add dword [rdi], 1
        lock or qword [rdi + 8], 0x40
        inc word [rdi + 0x10]
        mov rax, 0x1122334455667788
        xchg [rdi + 0x18], rax
        mov ecx, 5
        xadd [rdi + 0x20], ecx
        mov eax, 0x12345678
        mov edx, 0x9abcdef0
        cmpxchg [rdi + 0x28], edx
        neg byte [rdi + 0x30]
        mov rsi, 0x600000
        mov [rsi], rax
        mov [rsi + 8], rcx
        hlt
    """))
