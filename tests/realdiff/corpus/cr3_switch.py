"""CR3 switches between two address spaces that map the same address to different pages; one
variant edits the PTE of the inactive space before switching to it."""

import sys
from pathlib import Path

from kvmmu.guest.runtime import Map, Program, both_rings

if (_here := str(Path(__file__).parent)) not in sys.path:
    sys.path.append(_here)          # corpus files are loaded by path: _snippets.py is beside this one
from _snippets import kernel_store, load_cr3, results  # noqa: E402

VA = 0x70_0000
A, B, C = 0x64_0000, 0x64_1000, 0x64_2000
DATA = 0x60_0000
INIT = {DATA: bytes(64), A: b"\x0a" * 4096, B: b"\x0b" * 4096, C: b"\x0c" * 4096}

PROGRAMS = [
    *both_rings(Program(
        name="cr3_switch",
        doc="read in space 0, switch to space 1, read and write, switch back, read",
        maps=(Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x1000, A, "rw u")),
        spaces=((Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x1000, B, "rw u")),),
        data=INIT,
        code=f"""
            mov rdx, {VA:#x}
            mov rbx, [rdx]
            {load_cr3("CR3_1")}
            mov rcx, [rdx]
            mov qword [rdx + 8], 0x1111
            {load_cr3("CR3_0")}
            mov r8, [rdx]
            mov r9, [rdx + 8]
            {results(DATA, "rbx", "rcx", "r8", "r9")}
            hlt
        """)),
    *both_rings(Program(
        name="cr3_switch_inactive_edit",
        doc="edit the PTE of the inactive space, then switch to it (MOV CR3 resyncs)",
        maps=(Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x1000, A, "rw u")),
        spaces=((Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x1000, B, "rw u")),),
        data=INIT,
        code=f"""
            mov rdx, {VA:#x}
            {load_cr3("CR3_1")}
            mov rbx, [rdx]
            {load_cr3("CR3_0")}
            {kernel_store(f"pte_in(1, {VA:#x})", C | 7)}
            {load_cr3("CR3_1")}
            mov rcx, [rdx]
            {results(DATA, "rbx", "rcx")}
            hlt
        """)),
]
