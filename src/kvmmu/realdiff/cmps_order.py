"""Which operand of CMPS this machine's CPU reads first, measured on /dev/kvm.

The SDM gives CMPS no order for its two reads, and CPUs differ: the AMD EPYC of one of these
machine images reads DS:[RSI] first for ``repe cmpsb`` and ES:[RDI] first for every other form
(``cmpsb``, ``repne cmpsb``, ``repe cmpsw/d/q``), while the CPU of another image read ES:[RDI]
first for all of them.  With both operands on not-present pages the #PF's CR2 names the operand
read first, so a CPL3 guest (which runs on the CPU itself; CPL0 may be KVM's emulator, which always
reads the source first) tries each form once and the fault log answers.  It matters whenever one
operand faults into KVM and the other is RAM not mapped yet: the order decides whether the CPU
maps the RAM page before KVM takes the instruction over (``repe_cmps_cross`` in the corpus).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..guest.runtime import Program

PREFIXES = ("", "repe", "repne")
SIZES = {1: "b", 2: "w", 4: "d", 8: "q"}
_DATA = 0x60_0000

_lock = threading.Lock()
_cache: list[tuple[frozenset[tuple[str, int]], str]] = []


def probe_program() -> Program:
    """The CPL3 program: every (prefix, size) form with RSI on one not-present page, RDI on another."""
    from ..guest.runtime import Map, Program
    lines = []
    for i, (prefix, size) in enumerate(_forms()):
        lines += [f"mov rsi, {_DATA:#x}", f"mov rdi, {_DATA + 0x1000:#x}", "mov ecx, 1",
                  f"mov qword [RT_FIXUP], f{i}", f"{prefix} cmps{SIZES[size]}".strip(), f"f{i}:"]
    return Program(name="cmps_order_probe", cpl=3, doc="which CMPS operand the CPU reads first",
                   maps=(Map(_DATA, 0x1000, flags="rw u np"), Map(_DATA + 0x1000, 0x1000, flags="rw u np")),
                   faults={"pf": "resume"}, code="\n".join([*lines, "hlt"]))


def _forms() -> list[tuple[str, int]]:
    return [(prefix, size) for prefix in PREFIXES for size in SIZES]


def source_first_forms(cr2s: list[int]) -> frozenset[tuple[str, int]]:
    """The forms whose fault (one per form, in probe order) names RSI's page."""
    forms = _forms()
    if len(cr2s) != len(forms):
        raise ValueError(f"the CMPS probe logged {len(cr2s)} faults, expected {len(forms)}")
    return frozenset(form for form, cr2 in zip(forms, cr2s, strict=True) if cr2 >> 12 == _DATA >> 12)


def host_cmps_source_first() -> tuple[frozenset[tuple[str, int]], str]:
    """(forms read source first, source) on this machine's CPU; cached.  Without a usable /dev/kvm:
    no form (ES:[RDI] first, what every CPU measured so far does for plain CMPS)."""
    with _lock:
        if not _cache:
            _cache.append(_measure())
        return _cache[0]


def _measure() -> tuple[frozenset[tuple[str, int]], str]:
    from ..errors import KvmmuError
    from .backends import run_real
    try:
        obs = run_real(probe_program())
    except (OSError, KvmmuError):
        return frozenset(), "default (no /dev/kvm)"
    try:
        return source_first_forms([f.cr2 for f in obs.faults]), "measured on /dev/kvm"
    except ValueError:
        return frozenset(), "default (the probe did not fault as expected)"


__all__ = ["PREFIXES", "SIZES", "host_cmps_source_first", "probe_program", "source_first_forms"]
