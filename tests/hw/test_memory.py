"""SparseMemory: page-granular, allocate-on-write physical memory."""

from __future__ import annotations

import pytest

from kvmmu.errors import InvalidArgument
from kvmmu.hw.memory import SparseMemory


def test_unwritten_memory_reads_as_zero_without_allocating() -> None:
    """A read of a never-written address returns 0 and allocates no page."""
    mem = SparseMemory()
    assert mem.read(0x1234_5678, 8) == 0
    assert mem.read_bytes(0x10_0000, 64) == bytes(64)
    assert mem.read_pte(0x20_0000, 8) == 0
    assert mem.resident_pages() == 0


@pytest.mark.parametrize(("size", "value", "raw"), [
    (1, 0xAB, b"\xab"),
    (2, 0xBEEF, b"\xef\xbe"),
    (4, 0xDEAD_BEEF, b"\xef\xbe\xad\xde"),
    (8, 0x0123_4567_89AB_CDEF, b"\xef\xcd\xab\x89\x67\x45\x23\x01"),
])
def test_scalar_accesses_are_little_endian(size: int, value: int, raw: bytes) -> None:
    """1/2/4/8-byte accesses store the least significant byte at the lowest address."""
    mem = SparseMemory()
    mem.write(0x5000, size, value)
    assert mem.read_bytes(0x5000, size) == raw
    assert mem.read(0x5000, size) == value


def test_scalar_write_keeps_only_its_size() -> None:
    """A write of N bytes stores the value's low N bytes and leaves the neighbours alone."""
    mem = SparseMemory()
    mem.write(0x5000, 8, 0x1111_1111_1111_1111)
    mem.write(0x5002, 2, 0xABCDEF)
    assert mem.read(0x5000, 8) == 0x1111_1111_CDEF_1111


def test_narrower_reads_see_parts_of_a_wider_write() -> None:
    """Reads of 1, 2 and 4 bytes inside an 8-byte value see its little-endian pieces."""
    mem = SparseMemory()
    mem.write(0x7000, 8, 0x8877_6655_4433_2211)
    assert mem.read(0x7000, 1) == 0x11
    assert mem.read(0x7001, 2) == 0x3322
    assert mem.read(0x7004, 4) == 0x8877_6655


def test_scalar_access_across_a_page_boundary() -> None:
    """An 8-byte access 3 bytes before a page end spans two pages, both allocated."""
    mem = SparseMemory()
    mem.write(0x1FFD, 8, 0x0807_0605_0403_0201)
    assert mem.read(0x1FFD, 8) == 0x0807_0605_0403_0201
    assert mem.read_bytes(0x1FFD, 3) == b"\x01\x02\x03"
    assert mem.read_bytes(0x2000, 5) == b"\x04\x05\x06\x07\x08"
    assert mem.resident_pages() == 2


def test_byte_strings_across_pages() -> None:
    """read_bytes/write_bytes handle any length across several pages; unwritten bytes read 0."""
    mem = SparseMemory()
    data = bytes(range(256)) * 40                 # 10240 bytes: spans 4 pages from 0x3F00
    mem.write_bytes(0x3F00, data)
    assert mem.read_bytes(0x3F00, len(data)) == data
    assert mem.read_bytes(0x3E00, 0x100) == bytes(0x100)
    assert mem.resident_pages() == 4


def test_large_region_touched_in_a_few_pages_costs_only_those_pages() -> None:
    """A 512 MiB memory written at 5 places (one of them across a page boundary) holds 6 pages."""
    mem = SparseMemory(size=512 << 20)
    for addr in (0, 0x10_0000, 0x1000_0000, 0x1FFF_F000):
        mem.write(addr, 4, 0xFFFF_FFFF)
    mem.write(0x0800_0FFE, 4, 0x1234_5678)
    assert mem.resident_pages() == 6
    assert mem.read(0x1FFF_F000, 4) == 0xFFFF_FFFF
    assert mem.read(0x0800_0FFE, 4) == 0x1234_5678


@pytest.mark.parametrize("size", [0, 3, 5, 16, -1])
def test_bad_scalar_sizes_raise_invalid_argument(size: int) -> None:
    """Scalar accesses are 1, 2, 4 or 8 bytes; anything else is an InvalidArgument naming the size."""
    mem = SparseMemory()
    with pytest.raises(InvalidArgument, match="size"):
        mem.read(0, size)
    with pytest.raises(InvalidArgument, match="size"):
        mem.write(0, size, 0)


def test_accesses_outside_the_memory_raise_invalid_argument() -> None:
    """An access that does not lie inside [0, size) raises InvalidArgument."""
    mem = SparseMemory(size=1 << 20)
    with pytest.raises(InvalidArgument):
        mem.read(1 << 20, 4)
    with pytest.raises(InvalidArgument):
        mem.write((1 << 20) - 2, 4, 0)
    with pytest.raises(InvalidArgument):
        mem.read_bytes(-1, 2)
    assert mem.resident_pages() == 0


def test_cmpxchg_pte_writes_only_when_the_old_value_matches() -> None:
    """The walker's compare-and-exchange sets the entry only if it still holds the expected value."""
    mem = SparseMemory()
    mem.write(0x9008, 8, 0x1003)
    assert not mem.cmpxchg_pte(0x9008, 8, 0x1001, 0x1023)
    assert mem.read(0x9008, 8) == 0x1003
    assert mem.cmpxchg_pte(0x9008, 8, 0x1003, 0x1023)
    assert mem.read_pte(0x9008, 8) == 0x1023


def test_drop_and_restore_page() -> None:
    """A dropped page reads as zero until it is restored with its old contents."""
    mem = SparseMemory()
    mem.write(0x4010, 4, 0xCAFE)
    page = mem.drop_page(4)
    assert page is not None and mem.read(0x4010, 4) == 0 and mem.resident_pages() == 0
    mem.restore_page(4, page)
    assert mem.read(0x4010, 4) == 0xCAFE
