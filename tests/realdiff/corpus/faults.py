"""Faults the runtime records and resumes from: write to a read-only page, fetch from an NX page,
a non-canonical address (#GP), and (at CPL3) user access to a supervisor page."""

from kvmmu.guest.runtime import Map, Program, both_rings

DATA = 0x60_0000

PROGRAMS = both_rings(Program(
    name="faults_recorded",
    doc="#PF on a read-only page, #PF on an NX fetch, #GP on a non-canonical address, then a "
        "supervisor-page read (a #PF only at CPL3); each resumed at a fixup",
    maps=(Map(DATA, 0x1000, flags="rw u"), Map(0x70_0000, 0x1000, 0x64_0000, "u"),
          Map(0x70_1000, 0x1000, 0x64_1000, "rw u nx"), Map(0x70_2000, 0x1000, 0x64_2000, "rw")),
    data={DATA: bytes(64), 0x64_0000: b"\x01" * 4096, 0x64_1000: b"\xc3" * 4096, 0x64_2000: b"\x02" * 4096},
    faults={"pf": "resume", "gp": "resume"},
    code=f"""
        mov rsi, {DATA:#x}
        mov rdx, 0x700000
        mov rbx, [rdx]
        mov qword [RT_FIXUP], f1
        mov qword [rdx], 5
    f1: mov qword [RT_FIXUP], f2
        mov rax, 0x701000
        call rax
    f2: mov qword [RT_FIXUP], f3
        mov rax, 0x8000000000000000
        mov rcx, [rax]
    f3: mov qword [RT_FIXUP], f4
        mov rcx, [0x702000]
        mov [rsi + 8], rcx
    f4: mov [rsi], rbx
        hlt
    """))
