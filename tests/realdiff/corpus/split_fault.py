"""Page-crossing stores whose second page faults (docs/architecture/deviations.md, "Where KVM lets a guest tell").

On the hardware a faulting store has no effect.  KVM's emulator (emulator_read_write) writes the
first page before it translates the second, so where KVM emulates the store -- at CPL0 on this
host, where kernel code runs in KVM's emulator -- the first page's bytes change before the #PF.
The host profiles run the model with kvm_deviations=True, so both rings must agree with /dev/kvm.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

DATA = 0x60_0000

PROGRAMS = both_rings(Program(
    name="split_store_fault",
    doc="qword store across a RAM page into a not-present page, then into a read-only page; each #PF "
        "is resumed and the first page's bytes are read back",
    maps=(Map(DATA, 0x1000, flags="rw u"), Map(0x70_0000, 0x1000, 0x64_0000, "rw u"),
          Map(0x70_2000, 0x1000, 0x64_2000, "rw u"), Map(0x70_3000, 0x1000, 0x64_3000, "u")),
    data={DATA: bytes(64), 0x64_0000: b"\x11" * 4096, 0x64_2000: b"\x22" * 4096, 0x64_3000: b"\x33" * 4096},
    faults={"pf": "resume"},
    code=f"""
        mov rsi, {DATA:#x}
        mov rax, 0xaaaaaaaabbbbbbbb
        mov qword [RT_FIXUP], f1
        mov [0x700ffc], rax
    f1: mov qword [RT_FIXUP], f2
        mov [0x702ffc], rax
    f2: mov ecx, [0x700ffc]
        mov [rsi], rcx
        mov ecx, [0x702ffc]
        mov [rsi + 8], rcx
        hlt
    """))
