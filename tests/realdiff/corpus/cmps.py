"""CMPS with one operand in MMIO, both in MMIO, or both faulting.

The CPU reads ES:[RDI] before DS:[RSI] (the SDM names no order; measured here: when both operands
fault, CR2 is RDI), while KVM's emulator reads the source first.  Some CPUs read DS:[RSI] first for
some forms (an AMD EPYC image: ``repe cmpsb``), which maps RSI's RAM page before the #PF on MMIO
hands ``repe_cmps_cross`` to KVM (one more fixed fault); the kvm-pvm profile measures the order on
the running machine (kvmmu.realdiff.cmps_order).  At CPL3 on this host the CPU runs
the instruction: with RSI on RAM and RDI on MMIO the #PF on RDI hands the whole instruction to KVM's
emulator, which reads the RAM operand itself, so no spte is built for it (pf_fixed, pages_4k stay
low); with RSI on MMIO and RDI on RAM the CPU first faults the RAM page in.  At CPL0 KVM's emulator
runs everything: the both-faulting #PF names RSI.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

DATA = 0x60_0000
MMIO = 0xD000_0000
MAPS = (Map(DATA, 0x2000, flags="rw u"), Map(MMIO, 0x2000, flags="rw u"))


def _same_as_ram(addr: int, length: int, seq: int) -> int:
    return int.from_bytes(b"\x55" * length, "little")


PROGRAMS = [
    *both_rings(Program(
        name="cmps_ram_mmio", doc="cmpsb, then cmpsq: RSI on RAM pages not touched before, RDI on MMIO",
        maps=MAPS, data={DATA: bytes(range(64))},
        code=f"""
            mov rsi, {DATA:#x}
            mov rdi, {MMIO:#x}
            cmpsb
            mov rsi, {DATA + 0x1000:#x}
            cmpsq
            pushfq
            pop rax
            hlt""")),
    *both_rings(Program(
        name="cmps_mmio_ram", doc="cmpsb, then cmpsq: RSI on MMIO, RDI on RAM pages not touched before",
        maps=MAPS, data={DATA: bytes(range(64))},
        code=f"""
            mov rdi, {DATA:#x}
            mov rsi, {MMIO:#x}
            cmpsb
            mov rdi, {DATA + 0x1000:#x}
            cmpsq
            hlt""")),
    *both_rings(Program(
        name="cmps_mmio_mmio", doc="cmpsd with both operands on MMIO: the MMIO reads come source first",
        maps=MAPS, code=f"mov rsi, {MMIO:#x}\nmov rdi, {MMIO + 0x1000:#x}\ncmpsd\ncmpsw\nhlt")),
    *both_rings(Program(
        name="cmps_both_fault", doc="cmpsb with both operands on not-present pages, both ways round: CR2",
        maps=(Map(DATA, 0x1000, flags="rw u np"), Map(DATA + 0x1000, 0x1000, flags="rw u np")),
        faults={"pf": "resume"},
        code=f"""
            mov rsi, {DATA:#x}
            mov rdi, {DATA + 0x1000:#x}
            mov qword [RT_FIXUP], f1
            cmpsb
        f1: mov rsi, {DATA + 0x1000:#x}
            mov rdi, {DATA:#x}
            mov qword [RT_FIXUP], f2
            cmpsb
        f2: hlt""")),
    *both_rings(Program(
        name="repe_cmps_cross", doc="repe cmpsb over 8 bytes: RSI across a RAM page boundary, RDI on MMIO "
                                    "that reads back equal bytes",
        maps=MAPS, data={DATA: b"\x55" * 0x2000}, mmio_read=_same_as_ram,
        code=f"""
            mov rsi, {DATA + 0xffc:#x}
            mov rdi, {MMIO + 0x10:#x}
            mov ecx, 8
            repe cmpsb
            mov r8, rcx
            mov rsi, {DATA + 0x800:#x}
            mov rdi, {MMIO + 0xffe:#x}
            mov ecx, 3
            repe cmpsw
            hlt""")),
    *both_rings(Program(
        name="repe_cmps_ram_into_mmio", doc="repe cmpsb whose RDI runs from the end of a RAM page into the "
                                            "MMIO page after it (hardware iterations, then KVM's emulator); "
                                            "repne scasb over MMIO",
        maps=(Map(DATA, 0x2000, flags="rw u"), Map(0x70_0000, 0x1000, 0x64_0000, "rw u"),
              Map(0x70_1000, 0x1000, MMIO, "rw u")),
        data={DATA: b"\x55" * 0x2000, 0x64_0000: b"\x55" * 0x1000}, mmio_read=_same_as_ram,
        code=f"""
            mov rsi, {DATA + 0x800:#x}
            mov rdi, 0x700ffd
            mov ecx, 6
            repe cmpsb
            mov r8, rcx
            mov r9, rdi
            mov al, 0x54
            mov rdi, 0x701010
            mov ecx, 5
            repne scasb
            hlt""")),
]
