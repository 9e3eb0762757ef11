"""One VMM process's address space for guest RAM: anonymous mappings made and given back.

A memslot created without `userspace_addr` is backed by a fresh anonymous mapping (the VMM's mmap).
Deleting the slot gives the range back (`release`), but, as QEMU does when it only removes a memslot,
the VMM keeps the memory until the range is needed again: a slot re-created on the same
`userspace_addr` finds its old contents.  A new fresh mapping placed over a released range replaces
it (munmap + mmap): its pages leave host memory and it reads zeros.  First fit from the lowest address,
so a VMM that never deletes gets the addresses a bump allocator would give.
"""

from __future__ import annotations

from bisect import insort
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .host import Host


class VmmAddressSpace:
    """The free ranges of [start, end); mappings are page aligned."""

    __slots__ = ("host", "start", "end", "_free")

    def __init__(self, host: Host, start: int, end: int) -> None:
        self.host = host
        self.start = start
        self.end = end
        self._free: list[tuple[int, int]] = [(start, end)]    # sorted, disjoint, never adjacent

    def largest_free(self) -> int:
        return max((hi - lo for lo, hi in self._free), default=0)

    def mmap(self, size: int, in_use: list[tuple[int, int]] = (), align: int = 4096,  # type: ignore[assignment]
             offset: int = 0) -> int | None:
        """A fresh mapping of `size` bytes (a multiple of 4 KiB): its address, or None if no range fits.

        `in_use`: [lo, hi) ranges the VMM uses already without having mapped them here (memslots given an
        explicit userspace_addr); mmap never returns an address that is mapped.  `align`: on huge host
        pages Linux aligns a mapping at least one huge page long to that size (thp_get_unmapped_area),
        so that it can be backed by them.  `offset`: the mapping starts that many bytes past a multiple
        of `align` instead (a kernel that aligns anonymous mappings only to pages; see Host.anon_offset)."""
        def up(a: int) -> int:
            return ((a - offset + align - 1) & ~(align - 1)) + offset

        for i, (lo, hi) in enumerate(self._free):
            at = up(lo)
            for ulo, uhi in sorted(in_use):
                if ulo < at + size and at < uhi:
                    at = up(max(at, uhi))
            if at + size <= hi:
                pieces = [(a, b) for a, b in ((lo, at), (at + size, hi)) if b > a]
                self._free[i:i + 1] = pieces
                self._drop_pages(at >> 12, (at + size) >> 12)    # whatever was mapped here before is gone
                return at
        return None

    def release(self, hva: int, size: int) -> None:
        """Give [hva, hva + size), which mmap returned, back for later mappings (contents kept for now)."""
        insort(self._free, (hva, hva + size))
        merged: list[tuple[int, int]] = []
        for lo, hi in self._free:
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        self._free = merged

    def _drop_pages(self, first: int, last: int) -> None:
        """Forget host pages [first, last): contents, residency and swap (scan whichever is smaller)."""
        host = self.host
        for pages in (host.mem.pages, host.resident, host.swapped):
            if last - first <= len(pages):
                gone = [p for p in range(first, last) if p in pages]
            else:
                gone = [p for p in pages if first <= p < last]
            for p in gone:
                if isinstance(pages, set):
                    pages.discard(p)
                else:
                    del pages[p]
