"""The simulation clock's event order: timed events in host cycles, earliest first.

Time is host cycles everywhere (a vCPU's guest clock, the VMM's timers, the host's scheduler).  Each
consumer drains its own queue at its own moments: a vCPU its interrupts while it runs a slice
(`GuestOS.run_slice`), the VMM thread its timers between slices, the host scheduler its ready vCPUs
(`vmm.runner.HostRunner`).  Every queue of one `Clock` draws its tie-breaking sequence numbers from
that clock, so events due at the same cycle run in the order they were scheduled, whichever queue
holds them.
"""

from __future__ import annotations

import heapq
from typing import Generic, TypeVar

T = TypeVar("T")


class Clock:
    """The sequence every event of one simulation is ordered by, after its time."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = 0

    def ticket(self) -> int:
        self._last += 1
        return self._last

    def queue(self) -> EventQueue:
        return EventQueue(self)


class EventQueue(list, Generic[T]):
    """One consumer's timed items: a heap of (time, sequence, item).  A list underneath, so the hot
    "anything due?" test (`bool(queue)`) costs what it costs on a list."""

    __slots__ = ("_clock",)

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__()
        self._clock = clock if clock is not None else Clock()

    def push(self, when: int, item: T) -> None:
        heapq.heappush(self, (when, self._clock.ticket(), item))

    def pop(self) -> tuple[int, T]:  # type: ignore[override]
        """The earliest item and its time (the queue must not be empty)."""
        when, _, item = heapq.heappop(self)
        return when, item

    @property
    def next_time(self) -> int:
        """When the earliest item is due (the queue must not be empty)."""
        return self[0][0]
