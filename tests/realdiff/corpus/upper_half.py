"""Upper-half addresses: user pages in PML4 slots 256, 272, 300 and 511.

At CPL0 (KVM's emulator) every one of them works.  At CPL3 on this kvm_pvm host slot 256
(0xffff800000000000..0xffff807fffffffff) cannot be used: every access to it — read, write, fetch —
is a #PF whatever the guest's tables say (no pf_taken, no A bit in the guest's tables, one
insn_emulation_fail), with CR2 the address; its P and RSVD error-code bits change from run to run
(0x4 or 0xd for a read), so the #PF handler clears those two bits in the fault log before it resumes:
only what is stable is compared.  The other slots work at CPL3 as on hardware.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

U256, U272, U300, U511 = 0xFFFF_8000_0000_0000, 0xFFFF_8800_0000_0000, 0xFFFF_9600_0000_0000, 0xFFFF_FFFF_8000_0000
DATA = 0x60_0000
# Record, then clear P (bit 0) and RSVD (bit 3) in the logged error code, and resume.
STABLE_PF = """
    mov rax, [RT_LOG]
    shl rax, 5
    and qword [rax + RT_LOG_ENTRIES - 24], -10
    jmp rt_resume"""

PROGRAMS = both_rings(Program(
    name="upper_half",
    doc="reads of user pages in slots 256, 272, 511 and 300, a write and a call into slot 256, a "
        "store into slot 272",
    maps=(Map(U256, 0x1000, 0x61_0000, "rw u"), Map(U272, 0x1000, 0x62_0000, "rw u"),
          Map(U511, 0x1000, 0x63_0000, "rw u"), Map(U300, 0x1000, 0x64_0000, "rw u"),
          Map(DATA, 0x1000, flags="rw u")),
    data={0x61_0000: b"\x01" * 8 + b"\xc3", 0x62_0000: b"\x02" * 8, 0x63_0000: b"\x03" * 8,
          0x64_0000: b"\x04" * 8},
    faults={"pf": STABLE_PF, "gp": "resume"},
    code=f"""
        mov rsi, {DATA:#x}
        mov qword [RT_FIXUP], f1
        mov rdx, {U256:#x}
        mov rax, [rdx]
    f1: mov [rsi], rax
        mov rdx, {U272:#x}
        mov rax, [rdx]
        mov [rsi + 8], rax
        mov rdx, {U511:#x}
        mov rax, [rdx]
        mov [rsi + 16], rax
        mov rdx, {U300:#x}
        mov rax, [rdx]
        mov [rsi + 24], rax
        mov qword [RT_FIXUP], f2
        mov rdx, {U256 + 0x10:#x}
        mov qword [rdx], 5
    f2: mov qword [RT_FIXUP], f3
        mov rdx, {U256 + 8:#x}
        call rdx
    f3: mov rdx, {U272 + 0x20:#x}
        mov dword [rdx], 0x12345678
        hlt
    """))
