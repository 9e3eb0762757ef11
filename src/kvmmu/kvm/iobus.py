"""The in-kernel io bus (kvm_io_bus) and coalesced MMIO.

A device matches an access only if the access lies entirely inside the device's range; several
devices may share a range and are tried in order until one handles the access.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from typing import Protocol

from ..errors import InvalidArgument

NR_IOBUS_DEVS = 1000


class IoDevice(Protocol):
    def read(self, addr: int, length: int) -> int | None: ...     # None: not handled (-EOPNOTSUPP)
    def write(self, addr: int, length: int, value: int) -> bool: ...


class IoBus:
    def __init__(self) -> None:
        self.ranges: list[tuple[int, int, IoDevice]] = []

    def register(self, addr: int, length: int, dev: IoDevice) -> None:
        """kvm_io_bus_register_dev; everything is checked before the bus changes."""
        for v in (addr, length):
            if type(v) is not int or v < 0:
                raise InvalidArgument("io device range", v, "io-bus ranges are non-negative integers")
        if addr + length > 1 << 64:
            raise InvalidArgument("io device range", addr,
                                  f"[addr, addr + {length:#x}) must lie inside the 64-bit address space")
        if not all(callable(getattr(dev, m, None)) for m in ("read", "write")):
            raise InvalidArgument("io device", dev, "an in-kernel device has read(addr, length) and "
                                  "write(addr, length, value) methods")
        if len(self.ranges) >= NR_IOBUS_DEVS:
            raise InvalidArgument("io bus devices", len(self.ranges), f"a bus holds at most {NR_IOBUS_DEVS}")
        keys = [(a, n) for a, n, _ in self.ranges]
        i = bisect_right(keys, (addr, length))     # after equal ranges: registration order
        self.ranges.insert(i, (addr, length, dev))

    def unregister(self, dev: IoDevice) -> None:
        self.ranges = [r for r in self.ranges if r[2] is not dev]

    def _matches(self, addr: int, length: int) -> list[IoDevice]:
        out = []
        for base, size, dev in self.ranges:
            if base > addr:
                break
            if size == 0:
                if addr == base:
                    out.append(dev)
            elif addr + length <= base + size:
                out.append(dev)
        return out

    def write(self, addr: int, length: int, value: int) -> bool:
        return any(dev.write(addr, length, value) for dev in self._matches(addr, length))

    def read(self, addr: int, length: int) -> int | None:
        for dev in self._matches(addr, length):
            v = dev.read(addr, length)
            if v is not None:
                if not isinstance(v, int):
                    # The device's bug, found mid-access (as its own exception would be).
                    raise InvalidArgument("io device reply", v, "an in-kernel device's read() returns an int "
                                          "(the value, truncated to the access size) or None (not handled)")
                return v
        return None


class CoalescedMmio:
    """A coalesced-MMIO zone: writes are queued in a ring instead of exiting; reads still exit."""

    RING_SLOTS = 170      # one slot always stays empty, so 169 entries fit

    def __init__(self, ring: deque) -> None:
        self.ring = ring

    def read(self, addr: int, length: int) -> int | None:
        return None

    def write(self, addr: int, length: int, value: int) -> bool:
        if len(self.ring) >= self.RING_SLOTS - 1:
            return False
        self.ring.append((addr, length, value))
        return True
