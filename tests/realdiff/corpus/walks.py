"""KVM's walker sets no A bit on a walk that ends in a fault, at any level (notes §2, §6).

FAR1 has its own PML4E, PDPTE, PDE and a not-present PTE: the reads of it fault and its upper
entries keep A clear.  FAR2 (also its own tables) is made present by a kernel store and read: that
successful walk sets A at every level.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

FAR1 = 0x80_0000_0000
FAR2 = 0x100_0000_0000

PROGRAMS = both_rings(Program(
    name="no_a_bit_on_faulting_walk",
    doc="two faulting reads through never-accessed upper tables; another region mapped and read",
    maps=(Map(0x60_0000, 0x1000, flags="rw u"), Map(FAR1, 0x1000, 0x64_0000, "np"),
          Map(FAR2, 0x1000, 0x64_1000, "np")),
    data={0x60_0000: bytes(64), 0x64_0000: b"\x11" * 64, 0x64_1000: b"\x22" * 64},
    faults={"pf": "resume"},
    code=f"""
        mov rdx, {FAR1:#x}
        mov qword [RT_FIXUP], f1
        mov rax, [rdx]
    f1: mov qword [RT_FIXUP], f2
        mov qword [rdx + 8], 1
    f2: mov rdi, pte({FAR2:#x})
        mov rsi, 0x641005
        mov eax, 3
        svc
        mov rdx, {FAR2:#x}
        mov rcx, [rdx]
        mov rdi, 0x600000
        mov [rdi], rcx
        hlt
    """))
