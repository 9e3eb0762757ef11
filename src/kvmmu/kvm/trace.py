"""Trace events named after KVM's tracepoints (kvm_page_fault, kvm_mmu_set_spte, mark_mmio_spte, ...).

Disabled tracing costs one attribute test per event site.  Enabled, events go to a bounded ring
buffer and to subscribers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument


@dataclass(frozen=True)
class TraceEvent:
    seq: int
    name: str
    vcpu: int
    fields: dict[str, Any] = field(default_factory=dict)

    def format(self) -> str:
        args = " ".join(f"{k}={v:#x}" if isinstance(v, int) and not isinstance(v, bool) else f"{k}={v}"
                        for k, v in self.fields.items())
        return f"{self.seq:>8} vcpu{self.vcpu}: {self.name}: {args}"


class Trace:
    def __init__(self, capacity: int = 100_000) -> None:
        self.enabled = False
        self.events: deque[TraceEvent] = deque(maxlen=capacity)
        self.subscribers: list[Callable[[TraceEvent], None]] = []
        self.current_vcpu = -1
        self.dropped = 0
        self._seq = 0

    def enable(self, capacity: int | None = None) -> None:
        """Start recording; `capacity` bounds the ring of recent events (the oldest are dropped)."""
        if capacity is not None:
            if type(capacity) is not int or capacity < 0 or capacity >> 32:
                raise InvalidArgument("trace capacity", capacity, "the trace ring holds 0 to 2^32-1 events")
            self.events = deque(self.events, maxlen=capacity)
        self.enabled = True

    def subscribe(self, fn: Callable[[TraceEvent], None]) -> None:
        """Call fn(event) for every event from now on (and start recording)."""
        if not callable(fn):
            raise InvalidArgument("trace subscriber", fn, "a subscriber is a callable taking a TraceEvent")
        self.subscribers.append(fn)
        self.enabled = True

    def emit(self, name: str, **fields: Any) -> None:
        if not self.enabled:
            return
        self._seq += 1
        ev = TraceEvent(self._seq, name, self.current_vcpu, fields)
        if len(self.events) == self.events.maxlen:
            self.dropped += 1
        self.events.append(ev)
        for fn in self.subscribers:
            fn(ev)

    def names(self) -> list[str]:
        return [e.name for e in self.events]

    def clear(self) -> None:
        self.events.clear()
