"""Demand paging: the guest's #PF handler maps each faulting page of a window and retries.

`demand_read_first` runs with ``prefault=False``: it reads a page the VMM never wrote, which maps
the host zero page and makes the following write fault retry once (the MMU notifier zaps the spte
when the page is copied); the host profiles model that lazily allocated memory.
"""

from kvmmu.guest.runtime import Demand, Map, Program, both_rings

WINDOW = 0x70_0000
BACKING = 0x68_0000
DATA = 0x60_0000


def demand(name: str, body: str, prefault: bool = True) -> Program:
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
        """)


PROGRAMS = [
    *both_rings(demand("demand_paging", "mov [rdi + 8], rcx\n            add rbx, [rdi + 8]")),
    *both_rings(demand("demand_read_first", "add rbx, [rdi]\n            mov [rdi + 8], rcx", prefault=False)),
]
