"""High guest-physical addresses, within 36 bits (the narrowest guest MAXPHYADDR KVM gives a VMM;
frames at bit 36 and above depend on the CPUID the VMM sets): a memslot at 32 GiB, MMIO just
above 4 GiB and at the top of the 36-bit space, and a PTE with bit 51 set (reserved whatever the
width: a #PF with RSVD).
"""

from kvmmu.guest.runtime import Map, Program, Slot, both_rings

DATA = 0x60_0000
HIGH_RAM = 0x8_0000_0000          # 32 GiB
MMIO_4G = 0x1_0000_0000
MMIO_TOP = 0xF_FFFF_F000
SLOTS = (Slot(0, 0, 8 << 20), Slot(1, HIGH_RAM, 0x2000))

PROGRAMS = [
    *both_rings(Program(
        name="high_gpa", doc="RAM in a memslot at 32 GiB, MMIO at 4 GiB and at 64 GiB - 4 KiB",
        slots=SLOTS,
        maps=(Map(DATA, 0x1000, flags="rw u"), Map(0x70_0000, 0x2000, HIGH_RAM, "rw u"),
              Map(0x72_0000, 0x1000, MMIO_4G, "rw u"), Map(0x73_0000, 0x1000, MMIO_TOP, "rw u")),
        data={HIGH_RAM: b"\x5a" * 16},
        code=f"""
            mov rdx, 0x700000
            mov rax, [rdx]
            add qword [rdx + 8], 1
            mov dword [rdx + 0x1ffe], 0x01020304
            mov rdx, 0x720000
            mov dword [rdx + 0x10], 0xabcd
            mov rbx, [rdx + 0x18]
            mov rdx, 0x730000
            mov word [rdx + 0xffe], 0x7788
            mov ecx, [rdx + 0x20]
            mov rsi, {DATA:#x}
            mov [rsi], rax
            mov [rsi + 8], rbx
            mov [rsi + 16], rcx
            hlt""")),
    *both_rings(Program(
        name="pte_bit51_reserved", doc="a PTE with bit 51 set: #PF with RSVD (read and write), resumed",
        maps=(Map(DATA, 0x1000, flags="rw u"), Map(0x70_0000, 0x1000, 0x64_0000, "rw u")),
        data={0x64_0000: b"\x11" * 8},
        faults={"pf": "resume"},
        code=f"""
            mov rsi, 0x0008000000640007
            mov rdi, pte(0x700000)
            mov eax, 3
            svc
            mov rdi, 0x700000
            mov eax, 1
            svc
            mov qword [RT_FIXUP], f1
            mov rdx, 0x700000
            mov rbx, [rdx]
        f1: mov qword [RT_FIXUP], f2
            mov qword [rdx], 5
        f2: mov rsi, {DATA:#x}
            mov [rsi], rbx
            hlt""")),
]
