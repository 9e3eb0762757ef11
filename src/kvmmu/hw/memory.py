"""Sparse, page-granular physical memory.

A 512 MiB guest costs only the 4 KiB pages it has touched: a page is allocated on its first write
and reads of never-written pages return zeros without allocating anything.
"""

from __future__ import annotations

from struct import Struct

from ..errors import InvalidArgument

_PAGE = 4096
_OFF = _PAGE - 1
_FMT = {1: Struct("<B"), 2: Struct("<H"), 4: Struct("<I"), 8: Struct("<Q")}
# size -> the bound struct functions, for the hot paths (here and in the modelled CPU).
UNPACK_FROM = {n: f.unpack_from for n, f in _FMT.items()}
PACK_INTO = {n: f.pack_into for n, f in _FMT.items()}
_UNPACK_Q = UNPACK_FROM[8]
_ZERO_PAGE = bytes(_PAGE)


class SparseMemory:
    """Byte-addressed memory of `size` bytes backed by a dict of 4 KiB bytearrays."""

    __slots__ = ("pages", "size", "name")
    direct_pte_reads = True       # the page walker may read entries from `pages` itself (arch.walker)

    def __init__(self, size: int = 1 << 52, name: str = "memory") -> None:
        self.pages: dict[int, bytearray] = {}
        self.size = size
        self.name = name

    # -- internal helpers -------------------------------------------------------------------
    def _check(self, addr: int, length: int) -> None:
        if addr < 0 or length < 0 or addr + length > self.size:
            raise InvalidArgument(f"{self.name} address", addr,
                                  f"an access of {length} bytes must lie inside [0, {self.size:#x})")

    def _page_for_write(self, pfn: int) -> bytearray:
        page = self.pages.get(pfn)
        if page is None:
            page = self.pages[pfn] = bytearray(_PAGE)
        return page

    # -- scalar accesses (1/2/4/8 bytes, little endian) ------------------------------------------
    def read(self, addr: int, size: int) -> int:
        unpack = _UNPACK_Q if size == 8 else UNPACK_FROM.get(size)
        if unpack is None:
            raise InvalidArgument("size", size, "scalar accesses are 1, 2, 4 or 8 bytes")
        off = addr & _OFF
        if off + size <= _PAGE and addr >= 0 and addr + size <= self.size:
            page = self.pages.get(addr >> 12)
            return 0 if page is None else unpack(page, off)[0]
        return int.from_bytes(self.read_bytes(addr, size), "little")

    def write(self, addr: int, size: int, value: int) -> None:
        pack = PACK_INTO.get(size)
        if pack is None:
            raise InvalidArgument("size", size, "scalar accesses are 1, 2, 4 or 8 bytes")
        value &= (1 << (8 * size)) - 1
        off = addr & _OFF
        if off + size <= _PAGE and addr >= 0 and addr + size <= self.size:
            page = self.pages.get(addr >> 12)
            if page is None:
                page = self.pages[addr >> 12] = bytearray(_PAGE)
            pack(page, off, value)
            return
        self.write_bytes(addr, value.to_bytes(size, "little"))

    # -- byte strings -----------------------------------------------------------------------
    def read_bytes(self, addr: int, length: int) -> bytes:
        self._check(addr, length)
        out = bytearray()
        while length:
            off = addr & _OFF
            n = min(length, _PAGE - off)
            page = self.pages.get(addr >> 12)
            out += (_ZERO_PAGE if page is None else page)[off:off + n]
            addr += n
            length -= n
        return bytes(out)

    def write_bytes(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self._check(addr, len(data))
        pos = 0
        length = len(data)
        while pos < length:
            off = addr & _OFF
            n = min(length - pos, _PAGE - off)
            self._page_for_write(addr >> 12)[off:off + n] = data[pos:pos + n]
            addr += n
            pos += n

    # -- the page-walker protocol --------------------------------------------------------------
    def read_pte(self, addr: int, size: int) -> int:
        """Read a paging-structure entry; -1 means 'no memory there' (never the case here)."""
        page = self.pages.get(addr >> 12)
        if page is None:
            return 0 if 0 <= addr < self.size else -1
        if size == 8:
            return _UNPACK_Q(page, addr & _OFF)[0]
        return UNPACK_FROM[size](page, addr & _OFF)[0]

    def cmpxchg_pte(self, addr: int, size: int, old: int, new: int) -> bool:
        fmt = _FMT[size]
        page = self._page_for_write(addr >> 12)
        if fmt.unpack_from(page, addr & _OFF)[0] != old:
            return False
        fmt.pack_into(page, addr & _OFF, new)
        return True

    # -- bookkeeping ---------------------------------------------------------------------------
    def resident_pages(self) -> int:
        """Pages that hold host memory (the cost of this memory to the host)."""
        return len(self.pages)

    def drop_page(self, pfn: int) -> bytearray | None:
        """Remove a page (its contents are returned so a swap model can keep them)."""
        return self.pages.pop(pfn, None)

    def restore_page(self, pfn: int, page: bytearray) -> None:
        self.pages[pfn] = page
