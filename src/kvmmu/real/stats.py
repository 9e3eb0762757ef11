"""KVM's binary statistics (KVM_GET_STATS_FD): the counters the model's own ``stats`` imitate.

The fd's layout is self-describing: a header, an id string, one descriptor per statistic (with its
name) and a data block of u64 values.  The descriptors never change for the life of the fd, so they
are parsed once; a snapshot is then a single ``pread`` of the data block.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from struct import Struct

# flags, name_size, num_desc, id_offset, desc_offset, data_offset
_HEADER = Struct("<6I")
# flags, exponent, size, offset, bucket_size (the name follows)
_DESC = Struct("<IhHII")

STAT_TYPES = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}
STAT_UNITS = {0: "none", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}
STAT_BASES = {0: "pow10", 1: "pow2"}

StatValue = int | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StatDescriptor:
    """One statistic as the descriptor describes it; histograms have ``size`` > 1 buckets."""

    name: str
    type: str
    unit: str
    base: str
    exponent: int
    size: int
    offset: int
    bucket_size: int


class StatsReader:
    """Owns one stats fd; ``snapshot()`` returns ``{name: value}`` (tuples for histograms)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            head = os.pread(fd, _HEADER.size, 0)
            _flags, name_size, num_desc, id_offset, desc_offset, data_offset = _HEADER.unpack(head)
            self.id = os.pread(fd, name_size, id_offset).split(b"\0", 1)[0].decode()
            desc_size = _DESC.size + name_size
            raw = os.pread(fd, desc_size * num_desc, desc_offset)
            descs: dict[str, StatDescriptor] = {}
            for i in range(num_desc):
                base = i * desc_size
                flags, exponent, size, offset, bucket_size = _DESC.unpack_from(raw, base)
                name = raw[base + _DESC.size: base + desc_size].split(b"\0", 1)[0].decode()
                descs[name] = StatDescriptor(
                    name, STAT_TYPES.get(flags & 0xF, f"type{flags & 0xF}"),
                    STAT_UNITS.get((flags >> 4) & 0xF, f"unit{(flags >> 4) & 0xF}"),
                    STAT_BASES.get((flags >> 8) & 0xF, f"base{(flags >> 8) & 0xF}"),
                    exponent, size, offset, bucket_size)
        except BaseException:
            os.close(fd)
            raise
        self.descriptors: Mapping[str, StatDescriptor] = descs
        self._data_offset = data_offset
        self._data_len = max((d.offset + 8 * d.size for d in descs.values()), default=0)
        # One Struct over the whole block keeps a snapshot at a single unpack.
        self._data = Struct(f"<{self._data_len // 8}Q")
        self._layout = [(d.name, d.offset // 8, d.size) for d in descs.values()]

    def snapshot(self) -> dict[str, StatValue]:
        raw = os.pread(self.fd, self._data_len, self._data_offset)
        values = self._data.unpack(raw)
        out: dict[str, StatValue] = {}
        for name, index, size in self._layout:
            out[name] = values[index] if size == 1 else tuple(values[index:index + size])
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def stats_delta(before: Mapping[str, StatValue], after: Mapping[str, StatValue],
                nonzero: bool = False) -> dict[str, StatValue]:
    """``after - before`` per statistic (per bucket for histograms).

    Instant and peak statistics are subtracted too: for them the difference is a change of level,
    which is still what a phase-by-phase comparison with the model wants.
    """
    out: dict[str, StatValue] = {}
    for name, new in after.items():
        old = before.get(name, 0 if isinstance(new, int) else (0,) * len(new))
        if isinstance(new, int):
            assert isinstance(old, int)
            diff: StatValue = new - old
            changed = diff != 0
        else:
            assert isinstance(old, tuple)
            diff = tuple(a - b for a, b in zip(new, old, strict=True))
            changed = any(diff)
        if changed or not nonzero:
            out[name] = diff
    return out
