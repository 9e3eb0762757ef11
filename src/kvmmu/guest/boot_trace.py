"""Recorded boot-trace directories: the files, their validating readers, and the machine they describe.

A trace directory (docs/workloads.md, "Recorded trace directories") holds:

- ``mmio_trace.csv.gz`` (or ``mmio_trace.csv``), required: one row per device access, with the header
  ``seq,vcpu,kind,is_write,addr,size,value,region,pc,gva,cpu_size,phase``;
- ``mtree_flat.txt``, required: QEMU's ``info mtree -f``; the flat view that serves the address space
  ``"memory"`` gives the memslots (its ``ram`` sections, ``rom`` ones read-only), and its
  ``cpu-memory-N`` address spaces the number of vCPUs;
- ``guest_iomem.txt``, optional: the guest's ``/proc/iomem`` (cross-checked against the memslots);
- ``README.md``, optional: its first ``# `` heading names the machine (else the directory's name).

Every reader here refuses damaged input with a `ScenarioError` naming the file, the line and the rule
(no zlib, Unicode, csv or int-conversion exception escapes), before anything is replayed.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from importlib.abc import Traversable
from pathlib import Path
from typing import TypedDict

from ..errors import ScenarioError
from ..kvm.memslots import KVM_MEM_READONLY
from ..sim.textfile import read_text
from .trace_format import SIZES

TRACE_FILES = ("mmio_trace.csv.gz", "mmio_trace.csv")
MEMORY_MAP, IOMEM, DESCRIPTION = "mtree_flat.txt", "guest_iomem.txt", "README.md"
HEADER = ["seq", "vcpu", "kind", "is_write", "addr", "size", "value", "region", "pc", "gva", "cpu_size", "phase"]
KINDS = ("mmio", "pio", "dev")
MAX_VCPUS = 1024                                     # KVM_MAX_VCPUS on x86
GPA_LIMIT = 1 << 52                                  # x86's architectural physical-address width
MAX_TEXT = 8 << 20                                   # bytes of a memory-map / iomem / README file
MAX_FIELD = 256                                      # characters of one CSV field (a region name, a phase)

_MTREE_LINE = re.compile(r"^\s+([0-9a-f]{1,16})-([0-9a-f]{1,16}) \(prio -?\d{1,9}, (\w+)\): (.+)$")
_IOMEM_LINE = re.compile(r"^(\s*)([0-9a-f]{1,16})-([0-9a-f]{1,16}) : (.+)$")
_CPU_AS = re.compile(r'^ AS "cpu-memory-(\d{1,4})",', re.MULTILINE)
_HEX = re.compile(r"[0-9a-fA-F]{1,32}\Z")
_DEC = re.compile(r"-?[0-9]{1,12}\Z")

Source = Path | Traversable


# -- files -------------------------------------------------------------------------------------------
def _where(root: Source, name: str) -> str:
    return f"{root}/{name}" if isinstance(root, Path) else name


def read_text_file(root: Source, name: str, required: bool = True) -> str | None:
    """A small text file of the directory, decoded as UTF-8 (None if optional and absent)."""
    f = root.joinpath(name)
    if not f.is_file():
        if required:
            raise ScenarioError(f"{_where(root, name)}: missing (a trace directory needs {name})")
        return None
    return read_text(f, _where(root, name), MAX_TEXT, f"{MAX_TEXT >> 20} MiB, not a memory map")


def open_rows(root: Source) -> tuple[io.TextIOBase, str]:
    """The directory's trace as a text stream (gzip-compressed or plain) and its name for errors."""
    for name in TRACE_FILES:
        f = root.joinpath(name)
        if f.is_file():
            try:
                raw = f.open("rb")
            except OSError as exc:
                raise ScenarioError(f"{_where(root, name)}: cannot read it ({exc.strerror or exc})") from None
            binary = gzip.GzipFile(fileobj=raw, mode="rb") if name.endswith(".gz") else raw
            return io.TextIOWrapper(binary, encoding="utf-8", newline=""), _where(root, name)
    raise ScenarioError(f"{root}: no {' or '.join(TRACE_FILES)} (not a trace directory)")


def machine_name(root: Source, fallback: str) -> str:
    """What the recording says it is: the README's first heading, else `fallback`."""
    text = read_text_file(root, DESCRIPTION, required=False)
    for line in (text or "").splitlines():
        if line.startswith("# ") and line[2:].strip():
            return line[2:].strip()[:120]
    return fallback


# -- the memory map ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryRange:
    """One RAM or ROM section of the guest's flat memory view: one memslot."""

    start: int
    end: int                 # exclusive
    kind: str                # "ram" | "rom"
    name: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def flags(self) -> int:
        return KVM_MEM_READONLY if self.kind == "rom" else 0


def parse_mtree_flat(text: str, address_space: str = "memory") -> list[MemoryRange]:
    """RAM/ROM sections of the flat view that serves `address_space` (QEMU's `info mtree -f`)."""
    views = text.split("FlatView #")[1:]
    for view in views:
        if f'AS "{address_space}",' not in view:
            continue
        out = []
        for line in view.splitlines():
            m = _MTREE_LINE.match(line)
            if m and m.group(3) in ("ram", "rom"):
                start, last = int(m.group(1), 16), int(m.group(2), 16)
                out.append(MemoryRange(start, last + 1, m.group(3), m.group(4).strip()[:MAX_FIELD]))
        prev = None
        for r in sorted(out, key=lambda r: r.start):
            if r.start % 4096 or r.end % 4096:
                raise ScenarioError(f"mtree_flat.txt: section {r.name} [{r.start:#x}, {r.end:#x}) is not "
                                    "page-aligned, so it cannot be a memslot")
            if not r.start < r.end <= GPA_LIMIT:
                raise ScenarioError(f"mtree_flat.txt: section {r.name} [{r.start:#x}, {r.end:#x}): a memslot is a "
                                    "non-empty range below 2^52")
            if prev is not None and r.start < prev.end:
                raise ScenarioError(f"mtree_flat.txt: sections {prev.name} and {r.name} overlap at {r.start:#x}: "
                                    "a flat view's sections are disjoint")
            prev = r
        return out
    raise ScenarioError(f"mtree_flat.txt: no flat view serves the address space {address_space!r}")


def mtree_vcpus(text: str) -> int:
    """vCPUs of the machine: the flat views' ``cpu-memory-N`` address spaces (0 if none are named)."""
    ids = {int(n) for n in _CPU_AS.findall(text)}
    if ids and ids != set(range(len(ids))):
        raise ScenarioError(f"mtree_flat.txt: the cpu-memory address spaces are {sorted(ids)}, not 0..N-1")
    if len(ids) > MAX_VCPUS:
        raise ScenarioError(f"mtree_flat.txt: {len(ids)} vCPUs; KVM allows at most {MAX_VCPUS}")
    return len(ids)


def parse_iomem(text: str) -> list[tuple[int, int, str, int]]:
    """/proc/iomem as (start, end exclusive, name, nesting depth)."""
    out = []
    for line in text.splitlines():
        m = _IOMEM_LINE.match(line)
        if m:
            out.append((int(m.group(2), 16), int(m.group(3), 16) + 1, m.group(4), len(m.group(1)) // 2))
    return out


# -- the rows ----------------------------------------------------------------------------------------
@dataclass
class Access:
    """One CPU access to MMIO: an mmio row, or the rows of an access the recording VMM split."""

    line: int
    seq: int
    vcpu: int
    write: bool
    gva: int
    gpa: int
    size: int
    region: str
    phase: str
    parts: list[str]
    got: int
    pc: str


def _hexfield(where: str, line: int, name: str, text: str, bits: int) -> int:
    if not _HEX.match(text):
        raise ScenarioError(f"{where} line {line}: column {name}={text[:40]!r} is not a hex number")
    value = int(text, 16)
    if value >> bits:
        raise ScenarioError(f"{where} line {line}: column {name}={text[:40]!r} does not fit in {bits} bits")
    return value


def _decfield(where: str, line: int, name: str, text: str, lo: int, hi: int) -> int:
    if not _DEC.match(text) or not lo <= int(text) <= hi:
        raise ScenarioError(f"{where} line {line}: column {name}={text[:40]!r}: an integer from {lo} to {hi:,}")
    return int(text)


class RowCounts(TypedDict):
    """What `read_rows` counted: every row, by kind, by vCPU and by phase and kind; split MMIO rows merged."""

    rows: int
    kind: Counter[str]
    vcpu: Counter[int]
    phase_kind: dict[str, Counter[str]]
    merged: int


def read_rows(text: io.TextIOBase, where: str = "mmio_trace.csv") -> tuple[RowCounts, list[Access]]:
    """Counts per kind / vCPU / phase and the CPU accesses of the mmio rows (split rows merged)."""
    try:
        return _read_rows(text, where)
    except csv.Error as exc:
        raise ScenarioError(f"{where}: not a CSV trace ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{where}: not UTF-8 text ({exc.reason})") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise ScenarioError(f"{where}: damaged or truncated ({exc})") from None


def _read_rows(text: io.TextIOBase, where: str) -> tuple[RowCounts, list[Access]]:
    reader = csv.reader(text)
    header = next(reader, None)
    if header != HEADER:
        shown = header if header is None or len(str(header)) < 200 else str(header)[:200] + "..."
        raise ScenarioError(f"{where}: the header is {shown}, expected {HEADER}")
    counts: RowCounts = {"rows": 0, "kind": Counter(), "vcpu": Counter(), "phase_kind": {}, "merged": 0}
    phase_kind = counts["phase_kind"]
    accesses: list[Access] = []
    pending: dict[int, Access] = {}
    for line, row in enumerate(reader, 2):
        if len(row) != len(HEADER):
            raise ScenarioError(f"{where} line {line}: {len(row)} columns, expected {len(HEADER)}")
        seq, vcpu, kind, is_write, addr, size, value, region, pc, gva, cpu_size, phase = row
        if kind not in KINDS:
            raise ScenarioError(f"{where} line {line}: kind={kind[:40]!r}: a row is one of {KINDS}")
        long = next((i for i, f in enumerate(row) if len(f) > MAX_FIELD), None)
        if long is not None:
            raise ScenarioError(f"{where} line {line}: column {HEADER[long]} is longer than {MAX_FIELD} characters")
        # vcpu -1 is the VMM's own threads: only a device model's access (dev) may come from there.
        v = _decfield(where, line, "vcpu", vcpu, -1 if kind == "dev" else 0, MAX_VCPUS - 1)
        s = _decfield(where, line, "seq", seq, 0, 10**12)
        if is_write not in ("0", "1"):
            raise ScenarioError(f"{where} line {line}: column is_write={is_write[:40]!r}: 0 or 1")
        counts["rows"] += 1
        counts["kind"][kind] += 1
        counts["vcpu"][v] += 1
        phase_kind.setdefault(phase, Counter())[kind] += 1
        if kind != "mmio":
            continue
        if not gva or not cpu_size:
            raise ScenarioError(f"{where} line {line}: an mmio row needs gva and cpu_size")
        cs = _decfield(where, line, "cpu_size", cpu_size, 1, 16)
        if cs not in SIZES:
            raise ScenarioError(f"{where} line {line}: column cpu_size={cpu_size!r}: a CPU access is "
                                f"{', '.join(map(str, SIZES))} bytes")
        n = _decfield(where, line, "size", size, 1, 16)
        g, a = _hexfield(where, line, "gva", gva, 64), _hexfield(where, line, "addr", addr, 52)
        if value:
            _hexfield(where, line, "value", value, 128)
        part = Access(line, s, v, is_write == "1", g, a, n, region, phase, [value], n, pc)
        cur = pending.get(v)
        if cur is not None:
            if g != cur.gva + cur.got or a != cur.gpa + cur.got or pc != cur.pc or part.write != cur.write \
                    or cur.size != cs:
                raise ScenarioError(f"{where} line {line}: vCPU {v}'s access split at line {cur.line} "
                                    "is interrupted by an access that does not continue it")
            cur.parts.append(value)
            cur.got += n
            counts["merged"] += 1
            if cur.got == cur.size:
                del pending[v]
            elif cur.got > cur.size:
                raise ScenarioError(f"{where} line {line}: the pieces exceed cpu_size={cur.size}")
            continue
        if n == cs:
            accesses.append(part)
        elif n < cs:
            part.size = cs
            pending[v] = part
            accesses.append(part)
        else:
            raise ScenarioError(f"{where} line {line}: size={n} exceeds cpu_size={cs}")
    if pending:
        cur = next(iter(pending.values()))
        raise ScenarioError(f"{where} line {cur.line}: the trace ends inside a split access")
    return counts, accesses


def access_value(acc: Access, where: str = "mmio_trace.csv") -> tuple[int | None, int]:
    """The access's value from its rows, and how many rows logged more bits than their size.

    The recorder logged what the device model returned; for a few 4-byte HPET reads that is the
    whole 64-bit register, of which the CPU (and so the guest) got the low `size` bytes."""
    if any(p == "" for p in acc.parts):
        return None, 0
    piece = acc.size // len(acc.parts)
    mask = (1 << (8 * piece)) - 1
    out = wide = 0
    for i, p in enumerate(acc.parts):
        v = _hexfield(where, acc.line, "value", p, 128)
        wide += v > mask
        out |= (v & mask) << (8 * piece * i)
    return out, wide
