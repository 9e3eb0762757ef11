"""Guest page-table edits with and without INVLPG.

CPL0 code runs in KVM's emulator, which walks the guest tables on every access: an edit is seen at
once.  CPL3 code runs on KVM's shadow sptes: an edit made by (emulated) CPL0 code is a tracked
write that zaps the spte, but an edit made natively through a user mapping of the table page goes
to an *unsync* shadow page (a level-1 table is not write-protected) and stays invisible until
INVLPG; an edit made by the host between runs is never seen by KVM until INVLPG.
"""

import sys
from pathlib import Path

from kvmmu.guest.runtime import Map, Program, WritePhys, both_rings

if (_here := str(Path(__file__).parent)) not in sys.path:
    sys.path.append(_here)          # corpus files are loaded by path: _snippets.py is beside this one
from _snippets import invlpg, kernel_store, results  # noqa: E402

VA = 0x70_0000
A, B = 0x64_0000, 0x64_1000
ALIAS = 0x7F_0000
DATA = 0x60_0000
MAPS = (Map(DATA, 0x1000, flags="rw u"), Map(VA, 0x1000, A, "rw u"), Map(ALIAS, 0x1000, f"pt:{VA:#x}", "rw u"))
INIT = {DATA: bytes(64), A: b"\xaa" * 4096, B: b"\xbb" * 4096}
INVLPG = invlpg(VA)
RESULTS = results(DATA, "rbx", "rcx", "r8")


def remap(name: str, doc: str, edit: str, invlpg: bool, **kw: object) -> Program:
    return Program(
        name=name, doc=doc, maps=MAPS, data=INIT,
        code=f"""
            mov rdx, {VA:#x}
            mov rbx, [rdx]
            {edit}
            mov rcx, [rdx]
            {INVLPG if invlpg else "nop"}
            mov rdx, {VA:#x}
            mov r8, [rdx]
            {RESULTS}
            hlt
        """, **kw)


KERNEL_EDIT = kernel_store(f"pte({VA:#x})", B | 7)
ALIAS_EDIT = f"mov rdi, {ALIAS:#x} + (pte({VA:#x}) & 0xfff)\n    mov qword [rdi], {B | 7:#x}"

PROGRAMS = [
    *both_rings(remap("pte_kernel_edit_no_invlpg", "CPL0 store moves the PTE to another page, no INVLPG",
                      KERNEL_EDIT, False)),
    *both_rings(remap("pte_kernel_edit_invlpg", "CPL0 store moves the PTE, then INVLPG", KERNEL_EDIT, True)),
    *both_rings(remap("pte_alias_edit_no_invlpg", "the program rewrites its PTE through a user alias of the "
                      "table page, no INVLPG", ALIAS_EDIT, False)),
    *both_rings(remap("pte_alias_edit_invlpg", "the PTE rewritten through the alias, then INVLPG",
                      ALIAS_EDIT, True)),
    *both_rings(Program(
        name="pte_host_edit", doc="the host rewrites the PTE between two runs; read before and after INVLPG",
        maps=MAPS, data=INIT,
        between=((WritePhys(0, b""),),),          # replaced below with the PTE's address
        code=f"""
            mov rdx, {VA:#x}
            mov rbx, [rdx]
            hlt
            mov rcx, [rdx]
            {INVLPG}
            mov rdx, {VA:#x}
            mov r8, [rdx]
            {RESULTS}
            hlt
        """)),
    *both_rings(Program(
        name="pte_clear_present", doc="CPL0 store clears P; the next read faults (#PF recorded, resumed)",
        maps=MAPS, data=INIT, faults={"pf": "resume"},
        code=f"""
            mov rdx, {VA:#x}
            mov rbx, [rdx]
            {kernel_store(f"pte({VA:#x})", A | 6)}
            mov qword [RT_FIXUP], after
            mov rcx, [rdx]
            mov rcx, 1
        after:
            {kernel_store(f"pte({VA:#x})", A | 7)}
            mov r8, [rdx]
            {RESULTS}
            hlt
        """)),
    *both_rings(Program(
        name="pte_write_protect", doc="CPL0 store clears RW; the write faults; RW restored, the write works",
        maps=MAPS, data=INIT, faults={"pf": "resume"},
        code=f"""
            mov rdx, {VA:#x}
            mov qword [rdx], 1
            {kernel_store(f"pte({VA:#x})", A | 5)}
            mov qword [RT_FIXUP], after
            mov qword [rdx + 8], 2
        after:
            {kernel_store(f"pte({VA:#x})", A | 7)}
            mov qword [rdx + 16], 3
            hlt
        """)),
]


def _fix_host_edit(p: Program) -> Program:
    from dataclasses import replace

    from kvmmu.guest.runtime import build
    pte_gpa = build(p).pte(VA)
    return replace(p, between=((WritePhys(pte_gpa, (B | 0x27).to_bytes(8, "little")),),))


PROGRAMS = [_fix_host_edit(p) if p.name.startswith("pte_host_edit") else p for p in PROGRAMS]
