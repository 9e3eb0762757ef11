"""Memslot changes between runs: delete (the GPA becomes MMIO), re-add (fresh zeroed memory),
move (the old GPA becomes MMIO, the memory goes along), and re-add as read-only."""

from kvmmu.guest.runtime import Map, Program, Slot, both_rings

SLOT1 = 0x80_0000
MOVED = 0x90_0000
DATA = 0x60_0000
BASE = (Slot(0, 0, 8 << 20), Slot(1, SLOT1, 0x10000))
INIT = {DATA: bytes(64), SLOT1: b"\x77" * 4096}

PROGRAMS = [
    *both_rings(Program(
        name="slot_delete_readd",
        doc="run 1 uses slot 1; deleted, run 2 sees MMIO there; re-added, run 3 sees zeroed memory "
            "(written before it is read: see demand_paging.py on the host zero page)",
        slots=BASE, maps=(Map(DATA, 0x1000, flags="rw u"), Map(SLOT1, 0x2000, flags="rw u")), data=INIT,
        between=((Slot(1, SLOT1, 0),), (Slot(1, SLOT1, 0x10000),)),
        code=f"""
            mov rdx, {SLOT1:#x}
            mov rsi, {DATA:#x}
            mov rbx, [rdx]
            mov qword [rdx + 8], 0x1234
            mov [rsi], rbx
            hlt
            mov rbx, [rdx]
            mov qword [rdx + 8], 0x5678
            mov [rsi + 8], rbx
            hlt
            mov qword [rdx + 16], 0x9abc
            mov rbx, [rdx]
            mov rcx, [rdx + 8]
            mov [rsi + 16], rbx
            mov [rsi + 24], rcx
            hlt
        """)),
    *both_rings(Program(
        name="slot_move",
        doc="slot 1 moves to a new GPA between runs; the old one exits as MMIO, the new one has the data",
        slots=BASE, data=INIT,
        maps=(Map(DATA, 0x1000, flags="rw u"), Map(SLOT1, 0x1000, flags="rw u"), Map(MOVED, 0x1000, flags="rw u")),
        between=((Slot(1, MOVED, 0x10000),),),
        code=f"""
            mov rdx, {SLOT1:#x}
            mov rdi, {MOVED:#x}
            mov rsi, {DATA:#x}
            mov qword [rdx + 8], 0x4444
            mov rbx, [rdx]
            mov [rsi], rbx
            hlt
            mov rbx, [rdx]
            mov rcx, [rdi + 8]
            mov qword [rdi + 16], 0x5555
            mov [rsi + 8], rbx
            mov [rsi + 16], rcx
            hlt
        """)),
    *both_rings(Program(
        name="slot_readd_readonly",
        doc="slot 1 is deleted and re-added read-only: reads see zeroed memory, writes exit",
        slots=BASE, maps=(Map(DATA, 0x1000, flags="rw u"), Map(SLOT1, 0x1000, flags="rw u")), data=INIT,
        between=((Slot(1, SLOT1, 0),), (Slot(1, SLOT1, 0x10000, flags=2),)),
        code=f"""
            mov rdx, {SLOT1:#x}
            mov rsi, {DATA:#x}
            mov qword [rdx], 0x1111
            hlt
            hlt
            mov rbx, [rdx]
            mov qword [rdx], 0x2222
            mov rcx, [rdx]
            mov [rsi], rbx
            mov [rsi + 8], rcx
            hlt
        """)),
]
