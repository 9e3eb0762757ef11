"""A #PF that KVM injects from its emulator with P=0 does not invalidate the page (docs/architecture/deviations.md,
"Where KVM lets a guest tell").  The guest clears the P bit of a PTE it has used, twice through its own
writable mapping of the table (so KVM lets the shadowed table go unsync), without INVLPG; a load that
crosses into an MMIO page is emulated, the emulator's walk finds P=0 and injects #PF.  The SDM says
that #PF invalidates the page's translations; kvm_inject_emulated_page_fault invalidates only for P=1,
so at CPL3, where the CPU runs on the stale unsync spte, the next load of the page succeeds.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

DATA = 0x60_0000
PAGE = 0x70_0000

PROGRAMS = both_rings(Program(
    name="stale_after_pf",
    doc="clear a used PTE's P bit without INVLPG, #PF from an emulated page-crossing load, then load "
        "the page again",
    maps=(Map(DATA, 0x1000, flags="rw u"), Map(PAGE, 0x1000, 0x64_0000, "rw u"),
          Map(PAGE + 0x1000, 0x1000, 0xD000_0000, "rw u"), Map(0x71_0000, 0x1000, f"pt:{PAGE:#x}", "rw u")),
    data={DATA: bytes(64), 0x64_0000: b"\x44" * 4096},
    faults={"pf": "resume"},
    code=f"""
        mov rsi, {DATA:#x}
        mov rax, [{PAGE + 0xff8:#x}]
        mov [rsi], rax
        mov rdi, 0x710000 + (pte({PAGE:#x}) & 0xfff)
        mov rax, [rdi]
        and rax, -2
        mov [rdi], rax
        mov [rdi], rax
        mov qword [RT_FIXUP], f1
        mov rbx, [{PAGE + 0xffc:#x}]
    f1: mov qword [RT_FIXUP], f2
        mov rcx, [{PAGE + 0xff8:#x}]
        mov [rsi + 8], rcx
    f2: hlt
    """))
