"""A guest-runtime test program as data: what to run (`Program`), the pages it maps (`Map`), its
memslots (`Slot`), what the host does between runs (`WritePhys`, `Slot`) and the demand-paging
window (`Demand`).  `kvmmu.guest.runtime.build` lays a Program out in guest memory (and
re-exports these names); the module docstring there says what the runtime does with each part.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from ..arch import bits
from ..errors import InvalidArgument
from ..kvm.memslots import KVM_MEM_READONLY

PTE_P, PTE_RW, PTE_US = bits.PT_PRESENT_MASK, bits.PT_WRITABLE_MASK, bits.PT_USER_MASK
PTE_A, PTE_D, PTE_PS = bits.PT_ACCESSED_MASK, bits.PT_DIRTY_MASK, bits.PT_PAGE_SIZE_MASK
PTE_NX = bits.PT64_NX_MASK
_FLAG_TOKENS = {"r": 0, "ro": 0, "w": PTE_RW, "rw": PTE_RW, "u": PTE_US, "user": PTE_US, "a": PTE_A,
                "d": PTE_D, "nx": PTE_NX}



@dataclass(frozen=True)
class Map:
    """Map [gva, gva+size) to [gpa, ...) (identity when gpa is None) with 4 KiB or 2 MiB pages.

    ``flags``: tokens ``rw``/``w`` (writable; else read-only), ``u``/``user``, ``nx``, ``a``, ``d``
    (preset accessed/dirty), ``np`` (build the tables but leave the PTEs not present), ``2m``.
    """

    gva: int
    size: int = 0x1000
    gpa: int | str | None = None
    flags: str = "rw"

    @property
    def alias(self) -> tuple[int, int] | None:
        """For ``gpa="pt:GVA"`` (``"pt1:GVA"`` for address space 1...): (space, GVA) — the page is
        the level-1 table that maps GVA, so the program can edit PTEs through this mapping."""
        if not isinstance(self.gpa, str):
            return None
        m = re.fullmatch(r"pt(\d*):(.+)", self.gpa.strip())
        if not m:
            raise InvalidArgument("Map.gpa", self.gpa, 'a page-table alias is written "pt:GVA" or "ptN:GVA"')
        return int(m.group(1) or 0), int(m.group(2), 0)

    @property
    def tokens(self) -> set[str]:
        return set(self.flags.lower().replace(",", " ").split())

    @property
    def page_size(self) -> int:
        return 2 << 20 if "2m" in self.tokens else 4096

    @property
    def present(self) -> bool:
        return "np" not in self.tokens

    def pte_flags(self) -> int:
        bits = PTE_P
        for t in self.tokens:
            if t in ("np", "2m", "p"):
                continue
            if t not in _FLAG_TOKENS:
                raise InvalidArgument("Map.flags", self.flags,
                                      f"unknown token {t!r}; tokens are {sorted(_FLAG_TOKENS)} + np, 2m")
            bits |= _FLAG_TOKENS[t]
        return bits


@dataclass(frozen=True)
class Slot:
    """A memslot: KVM_SET_USER_MEMORY_REGION(slot, flags, guest_phys_addr, memory_size).  Size 0
    deletes; re-issuing a live slot id with another gpa moves it (its memory goes along)."""

    slot: int
    gpa: int
    size: int
    flags: int = 0

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)


@dataclass(frozen=True)
class WritePhys:
    """The host (VMM) writes guest memory through its mapping between two runs (KVM does not see it)."""

    gpa: int
    data: bytes


@dataclass(frozen=True)
class Demand:
    """The "demand" #PF action maps a faulting page of [gva, gva+size) to gpa + offset, with flags."""

    gva: int
    size: int
    gpa: int
    flags: str = "rw u"


def default_mmio_read(addr: int, length: int, seq: int) -> int:
    """The default device: a value that depends on the address, the length and the exit number."""
    v = (0x5A17_C0DE_0000_0000 | (addr & 0xFFFF_FFFF)) ^ ((seq + 1) * 0x0101_0101_0101_0101)
    return v & ((1 << (8 * length)) - 1)


Action = Slot | WritePhys


@dataclass(frozen=True)
class Program:
    """One test guest.  ``code`` runs at ``cpl``; each ``hlt`` ends a run, after which the host
    applies ``between[i]`` (memslot changes, memory writes) and resumes it; the program is over
    after the last run.

    ``spaces`` adds address spaces for CR3 switches: each has the runtime's and the text's mappings
    plus its own maps; the code sees ``CR3_0`` (the first, ``maps``), ``CR3_1``... and ``pte(gva)``,
    ``pte_in(space, gva)``, ``pde(gva)`` for entry addresses.  ``expect`` documents an understood
    difference between the model and the real host, by observable name (see kvmmu.realdiff).

    ``prefault``: the real VMM writes every guest page the program can reach (what its maps and
    demand window point at, the runtime's pages) when it creates a memslot, so the host has no
    lazily allocated or zero-page-backed guest memory there — the model's host (every page
    resident) — and KVM's fault path never meets a COW.  Turn it off to see those effects."""

    name: str
    code: str
    cpl: int = 0
    doc: str = ""
    maps: tuple[Map, ...] = ()
    slots: tuple[Slot, ...] = (Slot(0, 0, 8 << 20),)
    data: Mapping[int, bytes] = field(default_factory=dict)
    faults: Mapping[int | str, str] = field(default_factory=dict)
    demand: Demand | None = None
    fixup: str | int | None = None
    between: tuple[tuple[Action, ...], ...] = ()
    symbols: Mapping[str, int] = field(default_factory=dict)
    spaces: tuple[tuple[Map, ...], ...] = ()
    mmio_read: Callable[[int, int, int], int] = default_mmio_read
    nx: bool = False                 # EFER.NXE (also set when a map uses "nx")
    cr0_wp: bool = True              # CR0.WP
    cr4: int = 0                     # extra CR4 bits, e.g. SMEP (1 << 20), SMAP (1 << 21)
    prefault: bool = True            # the VMM populates guest RAM up front (like QEMU -mem-prealloc)
    host_hugepages: bool = False     # guest RAM on 2 MiB host pages (transparent huge pages)
    max_steps: int = 200_000
    expect: Mapping[str, str] = field(default_factory=dict)   # documented differences, by observable

    def at_cpl(self, cpl: int, suffix: str | None = None) -> Program:
        """The same program at another ring (name gets ``_cpl0`` / ``_cpl3`` unless ``suffix``)."""
        return replace(self, cpl=cpl, name=f"{self.name}{suffix if suffix is not None else f'_cpl{cpl}'}")

    @property
    def runs(self) -> int:
        return len(self.between) + 1


def both_rings(program: Program) -> list[Program]:
    """The CPL0 and CPL3 versions of a program."""
    return [program.at_cpl(0), program.at_cpl(3)]



__all__ = [
    "PTE_A", "PTE_D", "PTE_NX", "PTE_P", "PTE_PS", "PTE_RW", "PTE_US", "Action", "Demand", "Map", "Program",
    "Slot", "WritePhys", "both_rings", "default_mmio_read",
]
