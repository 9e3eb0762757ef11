"""Guest page tables built from a description, in any paging mode.

The builder only decides *what* to write; a writer callable decides *how*: through the VMM's mmap
(`vm.write_phys`, invisible to KVM, as before the guest starts) or by the guest itself through its
vCPU (`vcpu_writer`), so that shadow paging sees every write to a write-protected table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..arch.bits import PT64_NX_MASK
from ..errors import InvalidArgument

if TYPE_CHECKING:
    from ..kvm.vcpu import Vcpu
    from ..kvm.vm import VM

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
        if not isinstance(mode, str) or mode not in _LEVELS:
            raise InvalidArgument("mode", mode, f"guest paging modes are {sorted(_LEVELS)}")
        if not callable(write) or not callable(read):
            raise InvalidArgument("write/read", (write, read), "the table writer and reader are callables")
        # 32-bit entries and a 32-bit CR3 (also PAE's) hold only addresses below 4 GiB.
        top = 1 << 32 if mode in ("32bit", "pae") else 1 << 52
        if type(pool) is not int or pool < 0 or pool & 0xFFF or pool >= top:
            raise InvalidArgument("pool", pool, f"the table pool starts at a page-aligned gpa below {top:#x}")
        if pool_end is not None and (type(pool_end) is not int or not pool <= pool_end <= top):
            raise InvalidArgument("pool_end", pool_end, f"the table pool ends between pool ({pool:#x}) and {top:#x}")
        self.mode = mode
        self.levels = _LEVELS[mode]
        self.esize = 4 if mode == "32bit" else 8
        self.bits = 10 if mode == "32bit" else 9
        self.write, self.read = write, read
        self.next = pool
        self.pool_end = pool_end if pool_end is not None else min(pool + (64 << 20), top)
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

    def _check_gva(self, gva: object) -> int:
        """gva is an address this mode translates: 32 bits for 32-bit and PAE paging, canonical for
        4- and 5-level paging, below 2^48 / 2^57 for EPT (a guest-physical address)."""
        bits = {2: 32, 3: 32, 4: 48, 5: 57}[self.levels]
        if type(gva) is not int or gva < 0 or gva >> 64:
            raise InvalidArgument("gva", gva, "an address is an unsigned 64-bit integer")
        if bits == 32 or self.ept:
            if gva >> bits:
                raise InvalidArgument("gva", gva, f"{self.mode} tables translate {bits}-bit addresses")
        elif (gva >> (bits - 1)) not in (0, (1 << (65 - bits)) - 1):
            raise InvalidArgument("gva", gva, f"{self.mode} tables translate canonical {bits}-bit addresses")
        return gva

    def _check_entry_bits(self, name: str, value: object) -> None:
        if value is not None and (type(value) is not int or value < 0 or value >> (8 * self.esize)):
            raise InvalidArgument(name, value, f"{self.mode} entries are {8 * self.esize}-bit integers")

    def entry_addr(self, gva: int, level: int, create: bool = True, upper: int | None = None) -> int:
        """Guest-physical address of the entry that maps gva at `level` (tables created on the way)."""
        self._check_gva(gva)
        if type(level) is not int or not 1 <= level <= self.levels:
            raise InvalidArgument("level", level, f"{self.mode} tables have levels 1 to {self.levels}")
        self._check_entry_bits("upper", upper)
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
        level = self._check_map(gva, gpa, page_size, flags, upper, pkey)
        if flags is None:
            flags = EPT_RWX | EPT_WB if self.ept else P | RW | US
        value = gpa | flags | (PS if level > 1 else 0) | (pkey << 59)
        if self.mode == "32bit" and level == 2:
            value = (gpa & 0xFFC00000) | (((gpa >> 32) & 0xF) << 13) | flags | PS
        addr = self.entry_addr(gva, level, upper=upper)
        self.write(addr, self.esize, value)
        return addr

    def _check_map(self, gva: object, gpa: object, page_size: object, flags: object, upper: object,
                   pkey: object) -> int:
        """Every argument of map() before anything is written; returns the leaf level."""
        size = page_size if type(page_size) is int else 0
        level = _PAGE_LEVEL.get(size)
        if level is None or (page_size == 4 << 20) != (self.mode == "32bit" and level == 2) and level == 2 \
                or level > self.levels or (level == 3 and self.mode == "pae"):
            raise InvalidArgument("page_size", page_size, f"{self.mode} paging has no such page size")
        va = self._check_gva(gva)
        # A 4 KiB page's gpa goes in bits 31:12 of a 32-bit entry; a 4 MiB one adds PSE-36's bits 35:32.
        gpa_bits = 52 if self.esize == 8 else 36 if level == 2 else 32
        if type(gpa) is not int or gpa < 0 or gpa >> gpa_bits:
            raise InvalidArgument("gpa", gpa, f"a {self.mode} entry maps a gpa below 2^{gpa_bits}")
        if va % size:
            raise InvalidArgument("gva", gva, f"a {page_size}-byte page must be aligned to its size")
        if gpa % size:
            raise InvalidArgument("gpa", gpa, f"a {page_size}-byte page must be aligned to its size")
        self._check_entry_bits("flags", flags)
        self._check_entry_bits("upper", upper)
        if type(pkey) is not int or not 0 <= pkey < 16 or (pkey and self.esize == 4):
            raise InvalidArgument("pkey", pkey, "a protection key is 0 to 15 (always 0 in 32-bit entries)")
        return level

    def map_range(self, gva: int, gpa: int, length: int, flags: int | None = None, page_size: int = 4096) -> None:
        """Map [gva, gva + length) to [gpa, ...), one page at a time; the first and last pages are checked
        before anything is written, so a bad range maps nothing."""
        if type(length) is not int or length < 0:
            raise InvalidArgument("length", length, "a length is a non-negative integer")
        self._check_map(gva, gpa, page_size, flags, None, 0)
        if length:
            last = (length - 1) // page_size * page_size
            self._check_map(gva + last, gpa + last, page_size, flags, None, 0)
        for off in range(0, length, page_size):
            self.map(gva + off, gpa + off, page_size, flags)


def vm_writer(vm: VM) -> tuple[Writer, Reader]:
    """Write through the VMM's mapping of guest RAM (KVM does not see these writes)."""
    def write(gpa: int, size: int, value: int) -> None:
        vm.write_phys(gpa, value.to_bytes(size, "little"))

    def read(gpa: int, size: int) -> int:
        return int.from_bytes(vm.read_phys(gpa, size), "little")
    return write, read


def vcpu_writer(vcpu: Vcpu, gpa_to_gva: Callable[[int], int] = lambda gpa: gpa) -> tuple[Writer, Reader]:
    """Write as the guest kernel does: a CPL0 store through the vCPU (shadow paging traps it)."""
    # Besides a fault, an access may end in a VM exit to L1 (a vCPU running a nested guest) or a KVM
    # internal error: either way nothing was read or written.
    def write(gpa: int, size: int, value: int) -> None:
        r = vcpu.access(gpa_to_gva(gpa), size, "write", value, cpl=0)
        if not r.ok or r.l1_exit is not None:
            raise InvalidArgument("page-table write", gpa, f"the guest's own store failed: {r}")

    def read(gpa: int, size: int) -> int:
        r = vcpu.access(gpa_to_gva(gpa), size, "read", cpl=0)
        value = r.value
        if not r.ok or r.l1_exit is not None or value is None:
            raise InvalidArgument("page-table read", gpa, f"the guest's own load failed: {r}")
        return value
    return write, read
