"""What one backend showed for one program, and the pieces both backends share: the MMIO device
that answers the program's reads, the final memslot table, the memory capture, the fault log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..guest.runtime import (
    RT_LOG,
    RT_LOG_ENTRIES,
    RT_LOG_ENTRY_SIZE,
    RT_LOG_MAX,
    RT_PT_POOL,
    RT_PT_POOL_END,
    GuestImage,
    Program,
    Slot,
)

COUNTERS = ("exits", "mmio_exits", "pf_taken", "pf_fixed", "pf_emulate", "pf_guest", "pf_mmio_spte_created",
            "insn_emulation", "pages_4k", "pages_2m")
VM_COUNTERS = frozenset({"pages_4k", "pages_2m"})
EXTRA_COUNTERS = ("insn_emulation_fail", "invlpg", "halt_exits", "mmu_pte_write", "mmu_shadow_zapped",
                  "mmu_flooded", "mmu_unsync")
_VM_EXTRA = frozenset({"mmu_pte_write", "mmu_shadow_zapped", "mmu_flooded", "mmu_unsync"})
_X86_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
              "r14", "r15")
OBSERVABLES = ("stops", "mmio", "memory", "faults", "counters", "regs")
REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
             "r14", "r15", "rip", "rflags")


@dataclass(frozen=True)
class Mmio:
    """One KVM_EXIT_MMIO as the VMM saw it (for a read, the data the device answered)."""

    addr: int
    len: int
    write: bool
    data: bytes

    def __str__(self) -> str:
        return f"{'W' if self.write else 'R'} {self.addr:#x} len={self.len} data={self.data.hex()}"


@dataclass(frozen=True)
class FaultRecord:
    vector: int
    error_code: int
    cr2: int
    rip: int

    def __str__(self) -> str:
        return f"vec={self.vector} err={self.error_code:#x} cr2={self.cr2:#x} rip={self.rip:#x}"


@dataclass
class Observation:
    """Everything one backend showed for one program."""

    backend: str
    stops: list[str] = field(default_factory=list)
    mmio: list[Mmio] = field(default_factory=list)
    memory: dict[int, bytes] = field(default_factory=dict)
    faults: list[FaultRecord] = field(default_factory=list)
    fault_count: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    extra: dict[str, int] = field(default_factory=dict)
    regs: dict[str, int] = field(default_factory=dict)
    per_run: list[dict[str, int]] = field(default_factory=list)   # counters at the end of each run
    # SDM-undefined bits (model only): gpa byte -> bits, register -> bits, instructions using them
    undefined: dict[int, int] = field(default_factory=dict)
    undefined_regs: dict[str, int] = field(default_factory=dict)
    undefined_uses: list[str] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    # Every statistic of KVM's binary stats fds that moved (VM ones prefixed "vm."); real runs only.
    stats: dict[str, int] = field(default_factory=dict)
    # The model's trace events (name, fields) when run_model(trace=True): the lab compares them.
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


# -- the MMIO device both backends use ---------------------------------------------------------------
class MmioRecord(Protocol):
    """One KVM_EXIT_MMIO as the VMM's handler gets it: the model's `kvmmu.MmioExit` and the real
    backend's `kvmmu.real.MmioAccess` both have these fields."""

    # Read-only (properties), so a record whose data is always bytes (MmioExit) is one too.
    @property
    def phys_addr(self) -> int: ...

    @property
    def len(self) -> int: ...

    @property
    def is_write(self) -> bool: ...

    @property
    def data(self) -> bytes | None: ...


# The VMM's KVM_EXIT_MMIO handler, the same for `VM.mmio_handler` and `RealVcpu.run(mmio_handler=)`:
# called with each exit; a read is answered with an int, bytes or None (nothing there: all ones).
MmioHandler = Callable[[Any], "int | bytes | None"]


class Device:
    """Answers MMIO reads with ``program.mmio_read(addr, len, seq)``; seq counts every exit.  The device
    is the MMIO handler of both backends (`__call__`)."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.seq = 0

    def __call__(self, access: MmioRecord) -> int | None:
        if access.is_write:
            self.write()
            return None
        return self.read(access.phys_addr, access.len)

    def read(self, addr: int, length: int) -> int:
        value = self.program.mmio_read(addr, length, self.seq) & ((1 << (8 * length)) - 1)
        self.seq += 1
        return value

    def write(self) -> None:
        self.seq += 1

def final_slots(program: Program) -> dict[int, Slot]:
    """The memslot table after every `between` action (both backends end with this table)."""
    table = {s.slot: s for s in program.slots}
    for actions in program.between:
        for a in actions:
            if isinstance(a, Slot):
                if a.size == 0:
                    table.pop(a.slot, None)
                else:
                    table[a.slot] = a
    return table


def _decode_log(page: bytes | None) -> tuple[list[FaultRecord], int]:
    if page is None:
        return [], 0
    count = int.from_bytes(page[0:8], "little")
    out = []
    for i in range(min(count, RT_LOG_MAX)):
        off = RT_LOG_ENTRIES - RT_LOG + RT_LOG_ENTRY_SIZE * i
        words = [int.from_bytes(page[off + 8 * j:off + 8 * j + 8], "little") for j in range(4)]
        out.append(FaultRecord(*words))
    return out, count


def _capture_memory(program: Program, read: Any) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    zero = bytes(4096)
    for s in sorted(final_slots(program).values(), key=lambda s: s.gpa):
        for gpa in range(s.gpa, s.gpa + s.size, 4096):
            page = read(gpa, 4096)
            if page != zero:
                out[gpa] = page
    return out


def _guest_pages(program: Program, img: GuestImage) -> set[int]:
    """The guest-physical pages the guest can reach: every page a map (in any address space) or
    the demand window points at, and every page of the image.  ``prefault`` populates these."""
    pages = {gpa for gpa in img.memory}
    for maps in (program.maps, *program.spaces):
        for m in maps:
            if m.alias is not None or not isinstance(m.gpa, int | None):
                continue
            base = m.gva if m.gpa is None else m.gpa
            pages.update(range(base, base + m.size, 4096))
    if program.demand is not None:
        d = program.demand
        pages.update(range(d.gpa, d.gpa + d.size, 4096))
    for gpa in program.data:
        pages.add(gpa & ~0xFFF)
    pages.update(range(RT_PT_POOL, RT_PT_POOL_END, 4096))
    return pages


def _prefault(vm: Any, s: Slot, touch: set[int]) -> None:
    """The VMM writes every page of a new slot that the program can reach (``Program.prefault``)."""
    for page in sorted(p for p in touch if s.gpa <= p < s.gpa + s.size):
        vm.write_phys(page, bytes(4096))
