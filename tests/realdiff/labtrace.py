"""The model's trace of a lab program, printed by `kvmmu trace`'s trace-cmd formatter and read back
with the parser the lab reads the real kernel's lines with, so both sides are compared as text."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from kvmmu.guest.runtime import Program
from kvmmu.lab.trace import KEPT_EVENTS, MAX_KEPT, parse_line
from kvmmu.report.realdiff import run_model
from kvmmu.report.tracefmt import Record, report_line

# %p prints a hashed id: the same shape on both sides, never the same value.
_PTR = re.compile(r"(sptep[: ])([0-9a-f]{16})\b")
# fast_page_fault's old / new spte hold the host pfn (bits 12-51), which differs from host to host.
_FAST_PF_SPTES = re.compile(r"old 0x([0-9a-f]+) new ([0-9a-f]+)")
_PFN_MASK = ((1 << 52) - 1) & ~0xFFF


def normalise(event: str, text: str) -> str:
    text = _PTR.sub(r"\1<ptr>", text)
    if event == "fast_page_fault":
        text = _FAST_PF_SPTES.sub(lambda m: f"old {int(m[1], 16) & ~_PFN_MASK:#x} new {int(m[2], 16) & ~_PFN_MASK:x}",
                                  text)
    return text


def model_trace(program: Program, profile: str) -> tuple[Counter[str], dict[str, list[str]]]:
    """Every event's count, and the text of the events the lab keeps (at most MAX_KEPT each)."""
    obs = run_model(program, profile, trace=True)
    counts: Counter[str] = Counter()
    lines: dict[str, list[str]] = {}
    for seq, (name, fields) in enumerate(obs.events):
        counts[name] += 1
        if name in KEPT_EVENTS:
            parsed = parse_line(report_line(Record(seq * 1e-6, seq, 0, 0, name, fields)))
            assert parsed is not None and parsed.event == name, report_line(Record(0.0, seq, 0, 0, name, fields))
            bucket = lines.setdefault(name, [])
            if len(bucket) < MAX_KEPT:
                bucket.append(parsed.text.lstrip())   # trace-cmd pads the name column; ftrace does not
    return counts, lines


def real_trace(entry: dict[str, Any]) -> tuple[Counter[str], dict[str, list[str]]]:
    t = entry["trace"]
    return Counter(t["counts"]), {k: list(v) for k, v in t["lines"].items()}
