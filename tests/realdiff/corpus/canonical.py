"""Accesses at the top of the lower canonical half.

SDM: an access with any byte outside the canonical range is #GP(0).  KVM's emulator checks only the
first byte (``__linearize``), then accesses page by page (``emulator_read_write``): the bytes below
0x800000000000 are written, and KVM's walk of 0x800000000000 uses PML4 slot 256 of the guest's
tables — not present here, so a #PF with CR2 = 0x800000000000.  On this host that happens at both
rings: CPL0 runs in KVM's emulator, and at CPL3 KVM intercepts the CPU's #GP and emulates the
instruction.  An access whose first byte is non-canonical is #GP everywhere.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

TOP = 0x7FFF_FFFF_F000
BACK = 0x60_0000
UPPER = 0xFFFF_8000_0000_0000

STRADDLE = """
    mov rdi, 0x7ffffffffffe
    mov eax, 0xaabbccdd
    mov qword [RT_FIXUP], f1
    mov [rdi], eax
f1: mov qword [RT_FIXUP], f2
    mov rdi, 0x7ffffffffffb
    mov rax, 0x1122334455667788
    mov [rdi], rax
f2: mov qword [RT_FIXUP], f3
    mov rdx, 0x7ffffffffffd
    mov ecx, [rdx]
f3: mov qword [RT_FIXUP], f4
    mov rdx, 0xffff7ffffffffffe
    mov ecx, [rdx]
f4: mov qword [RT_FIXUP], f5
    mov rdx, 0x800000000000
    mov byte [rdx], 1
f5: mov rsi, 0x7ffffffffff0
    mov rbx, [rsi + 8]
    hlt
"""

PROGRAMS = [
    *both_rings(Program(
        name="canonical_straddle",
        doc="dword and qword stores, a dword load across 0x800000000000 (last page mapped); then "
            "accesses whose first byte is non-canonical",
        maps=(Map(TOP, 0x1000, BACK, "rw u"),), data={BACK: b"\x11" * 4096},
        faults={"pf": "resume", "gp": "resume"}, code=STRADDLE)),
    *both_rings(Program(
        name="canonical_straddle_slot256",
        doc="the same with the guest's PML4 slot 256 mapped (0xffff800000000000 -> a RAM page)",
        maps=(Map(TOP, 0x1000, BACK, "rw u"), Map(UPPER, 0x1000, BACK + 0x1000, "rw u")),
        data={BACK: b"\x11" * 4096, BACK + 0x1000: b"\x22" * 4096},
        faults={"pf": "resume", "gp": "resume"}, code=STRADDLE)),
]
