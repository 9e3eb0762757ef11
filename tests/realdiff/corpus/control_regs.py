"""Control-register state the walker obeys: CR0.WP off (supervisor writes to read-only pages),
CR0.WP toggled by MOV CR0 (a new MMU role: KVM must reload its root), SMEP and SMAP faults."""

from kvmmu.guest.runtime import Map, Program, both_rings

DATA = 0x60_0000
RO = 0x61_0000
MAPS = (Map(DATA, 0x1000, flags="rw u"), Map(RO, 0x1000, flags="u"), Map(0x62_0000, 0x1000, flags="rw"))
INIT = {DATA: b"\xc3" + bytes(63), RO: b"\x02" * 64, 0x62_0000: b"\x03" * 64}

PROGRAMS = [
    *both_rings(Program(
        name="cr0_wp_off",
        doc="CR0.WP=0: a CPL0 write to a read-only page succeeds (CPL3: #PF, resumed)",
        maps=MAPS, data=INIT, cr0_wp=False, faults={"pf": "resume"},
        code=f"""
            mov rdi, {RO:#x}
            mov qword [RT_FIXUP], done
            mov qword [rdi], 5
        done:
            hlt
        """)),
    *both_rings(Program(
        name="cr0_wp_toggle",
        doc="MOV CR0 clears WP, a write to a read-only page works, WP set again, the next one faults "
            "(CPL3: MOV from CR0 is #GP, the program stops there)",
        maps=MAPS, data=INIT, faults={"pf": "resume"},
        code=f"""
            mov rax, cr0
            and rax, -65537
            mov cr0, rax
            mov rdi, {RO:#x}
            mov qword [rdi], 5
            or rax, 65536
            mov cr0, rax
            mov qword [RT_FIXUP], done
            mov qword [rdi + 8], 6
        done:
            hlt
        """)),
    *both_rings(Program(
        name="smep_smap",
        doc="CR4.SMEP+SMAP: CPL0 fetch from and read of a user page fault (resumed); CPL3 is unaffected",
        maps=MAPS, data=INIT, cr4=(1 << 20) | (1 << 21), faults={"pf": "resume"},
        code=f"""
            mov rbx, 1
            mov qword [RT_FIXUP], f1
            mov rax, {DATA:#x}
            call rax
            mov rbx, 2
        f1: mov qword [RT_FIXUP], f2
            mov rcx, [{DATA + 8:#x}]
            mov rbx, 3
        f2: hlt
        """)),
]
