"""The lab's MMIO-spte scenarios: 64 reads of one unbacked page, and the memslot generation cases.

- ``mmio64``: 64 reads of one page no memslot covers, at CPL0.  With MMIO caching the first read
  installs one MMIO spte and the other 63 take the RSVD fast path.
- ``gen_slot_created``: two runs reading the MMIO page; between them a new memslot elsewhere bumps
  the memslot generation, so the next access finds a stale MMIO spte (``check_mmio_spte`` valid 0)
  and takes the full fault path once.
- ``gen_slot_deleted``: the same with a memslot deleted between the runs (``kvm_mmu_zap_all_fast``).
- ``gen_wraparound``: 2^18 dirty-logging flag toggles of a memslot between the runs, enough for the
  generation stored in MMIO sptes to wrap (KVM then zaps every MMIO spte once).
"""

from kvmmu.guest.runtime import Map, Program, Slot

MMIO = 0xD000_0000
DATA = 0x60_0000
SLOT1 = 0x80_0000
KVM_MEM_LOG_DIRTY_PAGES = 1
TOGGLES = 1 << 18


def _reads(n: int, label: str = "rd") -> str:
    return f"""
            mov ecx, {n}
        {label}: mov eax, dword [rdi]
            add rbx, rax
            loop {label}
    """


_READ_BOTH_RUNS = f"""
            mov rdi, {MMIO:#x}
            mov rsi, {DATA:#x}
            xor ebx, ebx
            {_reads(2)}
            mov [rsi], rbx
            hlt
            {_reads(2, "rd2")}
            mov [rsi + 8], rbx
            hlt
"""

_MAPS = (Map(DATA, 0x1000), Map(MMIO, 0x1000))
_TWO_SLOTS = (Slot(0, 0, 8 << 20), Slot(1, SLOT1, 0x10000))

PROGRAMS = [
    Program(
        name="mmio64",
        doc="64 reads of one unbacked page at CPL0",
        maps=_MAPS, data={DATA: bytes(8)},
        code=f"""
            mov rdi, {MMIO:#x}
            mov rsi, {DATA:#x}
            xor ebx, ebx
            {_reads(64)}
            mov [rsi], rbx
            hlt
        """),
    Program(
        name="gen_slot_created",
        doc="2 MMIO reads, a memslot created elsewhere, 2 more reads",
        maps=_MAPS, data={DATA: bytes(16)},
        between=((Slot(1, SLOT1, 0x10000),),),
        code=_READ_BOTH_RUNS),
    Program(
        name="gen_slot_deleted",
        doc="2 MMIO reads, a memslot deleted, 2 more reads",
        maps=_MAPS, slots=_TWO_SLOTS, data={DATA: bytes(16)},
        between=((Slot(1, SLOT1, 0),),),
        code=_READ_BOTH_RUNS),
    Program(
        name="gen_wraparound",
        doc=f"2 MMIO reads, {TOGGLES} dirty-logging flag toggles of memslot 1, 2 more reads",
        maps=_MAPS, slots=_TWO_SLOTS, data={DATA: bytes(16)},
        between=(tuple(Slot(1, SLOT1, 0x10000, KVM_MEM_LOG_DIRTY_PAGES if i % 2 == 0 else 0)
                       for i in range(TOGGLES)),),
        code=_READ_BOTH_RUNS),
]
