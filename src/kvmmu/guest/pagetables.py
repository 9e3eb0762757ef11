"""Guest page tables built from a description, in any paging mode.

The builder only decides *what* to write; a writer callable decides *how*: through the VMM's mmap
(`vm.write_phys`, invisible to KVM, as before the guest starts) or by the guest itself through its
vCPU (`vcpu_writer`), so that shadow paging sees every write to a write-protected table.
"""

from __future__ import annotations

from collections.abc import Callable

from ..arch.bits import PT64_NX_MASK
from ..errors import InvalidArgument

P, RW, US, PWT, PCD, A, D, PS, G = 1, 2, 4, 8, 16, 32, 64, 128, 256
NX = PT64_NX_MASK
_LEVELS = {"32bit": 2, "pae": 3, "4level": 4, "5level": 5, "ept4": 4, "ept5": 5}
EPT_R, EPT_W, EPT_X = 1, 2, 4
EPT_RWX = 7
EPT_WB = 6 << 3             # memory type write-back, in a leaf EPT entry
_PAGE_LEVEL = {4096: 1, 2 << 20: 2, 4 << 20: 2, 1 << 30: 3}

Writer = Callable[[int, int, int], None]       # (gpa, size, value)
Reader = Callable[[int, int], int]             # (gpa, size) -> value


class GuestPageTables:
    """One address space's tables: tables are taken from [pool, pool_end) one 4 KiB page at a time."""

    def __init__(self, mode: str, write: Writer, read: Reader, pool: int, pool_end: int | None = None) -> None:
        if mode not in _LEVELS:
            raise InvalidArgument("mode", mode, f"guest paging modes are {sorted(_LEVELS)}")
        self.mode = mode
        self.levels = _LEVELS[mode]
        self.esize = 4 if mode == "32bit" else 8
        self.bits = 10 if mode == "32bit" else 9
        self.write, self.read = write, read
        self.next = pool
        self.pool_end = pool_end if pool_end is not None else pool + (64 << 20)
        self.tables: list[int] = []
        self.ept = mode.startswith("ept")
        self.present = EPT_RWX if self.ept else P
        self.root = self.alloc_table()

    def alloc_table(self) -> int:
        if self.next + 4096 > self.pool_end:
            raise InvalidArgument("page-table pool", self.next, "the pool of page-table pages is exhausted")
        gpa = self.next
        self.next += 4096
        self.tables.append(gpa)
        return gpa

    @property
    def cr3(self) -> int:
        return self.root

    def eptp(self, ad: bool = False) -> int:
        """The EPT pointer for these tables: page-walk length, memory type WB, optional A/D."""
        return self.root | ((self.levels - 1) << 3) | 6 | ((1 << 6) if ad else 0)

    def index(self, gva: int, level: int) -> int:
        if self.mode == "pae" and level == 3:
            return (gva >> 30) & 3
        return (gva >> (12 + self.bits * (level - 1))) & ((1 << self.bits) - 1)

    def entry_addr(self, gva: int, level: int, create: bool = True, upper: int | None = None) -> int:
        """Guest-physical address of the entry that maps gva at `level` (tables created on the way)."""
        if upper is None:
            upper = EPT_RWX if self.ept else P | RW | US
        table = self.root
        for lvl in range(self.levels, level, -1):
            addr = table + self.esize * self.index(gva, lvl)
            entry = self.read(addr, self.esize)
            if not entry & self.present or (lvl <= 3 and entry & PS and not (self.mode == "pae" and lvl == 3)):
                if not create:
                    raise InvalidArgument("gva", gva, f"no table below level {lvl}")
                child = self.alloc_table()
                flags = P if self.mode == "pae" and lvl == 3 else upper
                self.write(addr, self.esize, child | flags)
                entry = child | flags
            table = entry & (0xFFFFF000 if self.esize == 4 else 0x000FFFFFFFFFF000)
        return table + self.esize * self.index(gva, level)

    def map(self, gva: int, gpa: int, page_size: int = 4096, flags: int | None = None, *,
            upper: int | None = None, pkey: int = 0) -> int:
        """Map one page; returns the address of its leaf entry (EPT: flags default to RWX, WB)."""
        if flags is None:
            flags = EPT_RWX | EPT_WB if self.ept else P | RW | US
        level = _PAGE_LEVEL.get(page_size)
        if level is None or (page_size == 4 << 20) != (self.mode == "32bit" and level == 2) and level == 2:
            raise InvalidArgument("page_size", page_size, f"{self.mode} paging has no such page size")
        if gpa % page_size or gva % page_size:
            raise InvalidArgument("gpa", gpa, f"a {page_size}-byte page must be aligned to its size")
        value = gpa | flags | (PS if level > 1 else 0) | (pkey << 59)
        if self.mode == "32bit" and level == 2:
            value = (gpa & 0xFFC00000) | (((gpa >> 32) & 0xF) << 13) | flags | PS
        addr = self.entry_addr(gva, level, upper=upper)
        self.write(addr, self.esize, value)
        return addr

    def map_range(self, gva: int, gpa: int, length: int, flags: int | None = None, page_size: int = 4096) -> None:
        for off in range(0, length, page_size):
            self.map(gva + off, gpa + off, page_size, flags)


def vm_writer(vm: object) -> tuple[Writer, Reader]:
    """Write through the VMM's mapping of guest RAM (KVM does not see these writes)."""
    def write(gpa: int, size: int, value: int) -> None:
        vm.write_phys(gpa, value.to_bytes(size, "little"))  # type: ignore[attr-defined]

    def read(gpa: int, size: int) -> int:
        return int.from_bytes(vm.read_phys(gpa, size), "little")  # type: ignore[attr-defined]
    return write, read


def vcpu_writer(vcpu: object, gpa_to_gva: Callable[[int], int] = lambda gpa: gpa) -> tuple[Writer, Reader]:
    """Write as the guest kernel does: a CPL0 store through the vCPU (shadow paging traps it)."""
    def write(gpa: int, size: int, value: int) -> None:
        r = vcpu.access(gpa_to_gva(gpa), size, "write", value, cpl=0)  # type: ignore[attr-defined]
        if r.fault is not None:
            raise InvalidArgument("page-table write", gpa, f"the guest's own store faulted: {r.fault}")

    def read(gpa: int, size: int) -> int:
        r = vcpu.access(gpa_to_gva(gpa), size, "read", cpl=0)  # type: ignore[attr-defined]
        if r.fault is not None:
            raise InvalidArgument("page-table read", gpa, f"the guest's own load faulted: {r.fault}")
        return r.value
    return write, read
