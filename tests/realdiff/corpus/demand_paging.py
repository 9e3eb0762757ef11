"""Demand paging: the guest's #PF handler maps each faulting page of a window and retries.

`demand_read_first` runs with ``prefault=False``: it reads a page the VMM never wrote, which on
the real host maps the host zero page and makes the following write fault retry once (see its
`expect`); with guest RAM populated up front (the default) it would agree.
"""

from kvmmu.guest.runtime import Demand, Map, Program, both_rings

WINDOW = 0x70_0000
BACKING = 0x68_0000
DATA = 0x60_0000
ZERO_PAGE = ("The real host backs a never-written guest page with the host zero page on a read fault; the "
             "first write then COWs it, the MMU notifier zaps the spte and that write fault retries "
             "(pf_taken + 1, exits + 1, no pf_fixed).  The model's host memory has no zero page.")


def demand(name: str, body: str, expect: dict[str, str] | None = None, prefault: bool = True) -> Program:
    return Program(
        name=name, doc="guest #PF handler maps pages of a window on demand", prefault=prefault,
        maps=(Map(DATA, 0x1000, flags="rw u"),),
        data={DATA: bytes(64)},
        faults={"pf": "demand"}, demand=Demand(WINDOW, 0x8000, BACKING, "rw u"),
        code=f"""
            mov rdi, {WINDOW:#x}
            mov ecx, 6
        next:
            {body}
            add rdi, 0x1000
            dec ecx
            jnz next
            mov rsi, {DATA:#x}
            mov [rsi], rbx
            hlt
        """, expect=expect or {})


PROGRAMS = [
    *both_rings(demand("demand_paging", "mov [rdi + 8], rcx\n            add rbx, [rdi + 8]")),
    demand("demand_read_first", "add rbx, [rdi]\n            mov [rdi + 8], rcx", prefault=False).at_cpl(0),
    demand("demand_read_first", "add rbx, [rdi]\n            mov [rdi + 8], rcx",
           {"counters": ZERO_PAGE}, prefault=False).at_cpl(3),
]
