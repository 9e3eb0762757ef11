"""KVM's tracepoints through tracefs: switching the ``kvm`` / ``kvmmmu`` events on, reading the
buffer around one program, and parsing the lines ftrace prints.

A line of ``trace`` looks like::

    python3-170     [000] d..1.   412.331052: mark_mmio_spte: sptep:000000008872c9bd gfn d0000 access 7 gen 2

(task-pid, CPU, the irq/preempt flags, the timestamp, the event name, then the event's own
``TP_printk`` text).  Only the event name and its text are kept: the rest differs from run to run.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
SYSTEMS = ("kvm", "kvmmmu")
# Events whose full text the lab keeps (the MMIO-spte machinery and zaps); others are counted only.
KEPT_EVENTS = ("mark_mmio_spte", "check_mmio_spte", "handle_mmio_page_fault", "kvm_mmu_zap_all_fast",
               "fast_page_fault")
MAX_KEPT = 64       # lines per event and program

_LINE = re.compile(r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+(?:\(\s*[-\d]+\)\s+)?\[(?P<cpu>\d+)\]\s+"
                   r"(?:(?P<flags>[^\s:]{4,6})\s+)?(?P<ts>\d+\.\d+):\s+(?P<event>[A-Za-z0-9_]+):\s?(?P<text>.*)$")
_ERROR_CODE = re.compile(r"error_code (?:0x)?([0-9a-fA-F]+)")
PFERR_RSVD = 1 << 3


@dataclass(frozen=True)
class TraceLine:
    event: str
    text: str
    timestamp: float

    def __str__(self) -> str:
        return f"{self.event}: {self.text}"


def parse_line(line: str) -> TraceLine | None:
    """One line of tracefs' ``trace`` file; None for comments, blanks and lost-event notes."""
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    m = _LINE.match(line)
    if m is None:
        return None
    return TraceLine(m["event"], m["text"].rstrip(), float(m["ts"]))


def parse_trace(text: str) -> list[TraceLine]:
    return [t for t in (parse_line(x) for x in text.splitlines()) if t is not None]


def fields(text: str) -> dict[str, str]:
    """``key value`` / ``key:value`` pairs of an event's text, as KVM prints most of its events
    (``gfn d0000 access 7 gen 2`` -> {gfn: d0000, access: 7, gen: 2}).  Values stay strings:
    KVM prints some in hex without a prefix."""
    out: dict[str, str] = {}
    tokens = text.replace(":", " ").split()
    i = 0
    while i + 1 < len(tokens):
        out[tokens[i]] = tokens[i + 1]
        i += 2
    return out


def rsvd_faults(lines: Iterable[TraceLine]) -> int:
    """Page-fault exits whose error code has PFERR_RSVD: the MMIO-spte fast path's entries
    (``kvm_page_fault`` prints the #NPF / #PF error code)."""
    n = 0
    for t in lines:
        if t.event == "kvm_page_fault":
            m = _ERROR_CODE.search(t.text)
            if m and int(m.group(1), 16) & PFERR_RSVD:
                n += 1
    return n


def summarize(lines: list[TraceLine], kept: Iterable[str] = KEPT_EVENTS, max_kept: int = MAX_KEPT) -> dict[str, object]:
    """What the lab stores per program: event counts, the text of the kept events, RSVD exits."""
    keep = set(kept)
    texts: dict[str, list[str]] = {}
    for t in lines:
        if t.event in keep:
            bucket = texts.setdefault(t.event, [])
            if len(bucket) < max_kept:
                bucket.append(t.text)
    return {"counts": dict(sorted(Counter(t.event for t in lines).items())), "lines": texts,
            "rsvd_faults": rsvd_faults(lines)}


class Tracefs:
    """The kvm and kvmmmu events of one tracefs instance (L1's only; the lab runs one job)."""

    def __init__(self, root: Path = TRACEFS, buffer_kb: int = 16384) -> None:
        self.root = root
        if not (root / "events").is_dir():
            raise FileNotFoundError(f"no tracefs at {root}")
        (root / "buffer_size_kb").write_text(str(buffer_kb))
        (root / "tracing_on").write_text("0")

    def enable(self, systems: Iterable[str] = SYSTEMS) -> None:
        for s in systems:
            (self.root / "events" / s / "enable").write_text("1")
        self.clear()
        (self.root / "tracing_on").write_text("1")

    def clear(self) -> None:
        (self.root / "trace").write_text("")

    def take(self) -> list[TraceLine]:
        """The buffer's lines so far; the buffer is emptied."""
        text = (self.root / "trace").read_text(errors="replace")
        self.clear()
        return parse_trace(text)

    def disable(self) -> None:
        (self.root / "tracing_on").write_text("0")
        for s in SYSTEMS:
            p = self.root / "events" / s / "enable"
            if p.exists():
                p.write_text("0")


__all__ = ["KEPT_EVENTS", "TRACEFS", "TraceLine", "Tracefs", "fields", "parse_line", "parse_trace", "rsvd_faults",
           "summarize"]
