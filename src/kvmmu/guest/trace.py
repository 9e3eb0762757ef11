"""Recorded guest access streams: the kvmmu trace format (JSON Lines), a validating reader, a writer
and `replay`, which runs the records on a VM's vCPUs.

The format
----------
One JSON object per line, UTF-8.  Empty lines are ignored.  The first line may be a header
``{"format": "kvmmu-trace", "version": 1}`` (any other keys of the header are free text, e.g.
"description"); without a header, version 1 is assumed.  Every other line is one record:

=========  ======================================================================================
field      meaning
=========  ======================================================================================
``vcpu``   required; the vCPU index (integer 0 to 1023)
``op``     required; ``"read"``, ``"write"``, ``"fetch"`` (an access) or ``"invlpg"`` (the guest
           invalidates the TLB entry of ``gva`` on that vCPU: a record with no ``size``/``value``)
``gva``    required; the guest-linear address (with paging off, the guest-physical address)
``size``   required for accesses, absent for ``invlpg``; 1, 2, 4, 8 or 16 bytes
``value``  optional; for a write the data written (absent: not recorded, the replay stores
           zeros), for a read or fetch the data the guest saw (the replay checks it and devices
           return it); must fit in ``size`` bytes
``gpa``    optional; the guest-physical address ``gva`` translated to when recorded; shares the
           page offset of ``gva``
``cr0``, ``cr3``, ``cr4``, ``efer``
           optional; the control registers in effect from this record on (absent: unchanged).
           A change of cr0/cr4/efer is applied as KVM_SET_SREGS; a change of cr3 alone is the
           guest's MOV to CR3
``cpl``    optional; the privilege level of the access (0-3; absent: the vCPU's current one)
``phase``  optional; a label for reports (e.g. "firmware", "kernel-boot")
``region`` optional; the device region the access reached (absent: RAM or not recorded)
``seq``    optional; the record's position in the original recording (integer 0 to 2**63-1)
=========  ======================================================================================

Addresses, values and control registers are JSON strings ``"0x"`` + 1 to 16 hex digits (JSON
numbers lose precision above 2**53); ``value`` may have up to 32 digits for 16-byte accesses.
Fields not listed are refused, so a misspelt field never passes silently; a line holds at most
4,096 characters.  Example::

    {"format": "kvmmu-trace", "version": 1}
    {"vcpu": 0, "op": "read", "gva": "0xffffffffff5fd030", "size": 4, "value": "0x50014", "gpa": "0xfee00030"}
    {"vcpu": 1, "op": "write", "gva": "0xffffcf264000b010", "size": 4, "value": "0x3", "phase": "kernel-boot"}

`read_trace` streams records and raises `ScenarioError` on the first bad line, naming the line
number, the field and the rule it breaks (the error also carries ``.line``, ``.field``, ``.rule``).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from ..errors import KvmmuError, ScenarioError

if TYPE_CHECKING:
    from ..kvm.emulate import MmioExit
    from ..kvm.vcpu import GuestFault, Vcpu
    from ..kvm.vm import VM

TRACE_FORMAT = "kvmmu-trace"
TRACE_VERSION = 1
ACCESS_OPS = ("read", "write", "fetch")
OPS = (*ACCESS_OPS, "invlpg")
SIZES = (1, 2, 4, 8, 16)
FIELDS = ("vcpu", "op", "gva", "size", "value", "gpa", "cr0", "cr3", "cr4", "efer", "cpl", "phase", "region",
          "seq")
_CREGS = ("cr0", "cr3", "cr4", "efer")
_HEX = re.compile(r"0x[0-9a-fA-F]{1,32}\Z")
_GPA_BITS = 52
MAX_VCPU_INDEX = 1023            # KVM_MAX_VCPUS on x86 is 1024
MAX_LINE = 4096                   # characters of one record (a full record is about 300)


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One line of a trace (see the module docstring for what each field means)."""

    vcpu: int
    op: str
    gva: int
    size: int = 0                # 0 for invlpg
    value: int | None = None
    gpa: int | None = None
    cr0: int | None = None
    cr3: int | None = None
    cr4: int | None = None
    efer: int | None = None
    cpl: int | None = None
    phase: str | None = None
    region: str | None = None
    seq: int | None = None
    line: int = 0                # where it came from (0: built in memory)

    @property
    def has_sregs(self) -> bool:
        return self.cr0 is not None or self.cr3 is not None or self.cr4 is not None or self.efer is not None

    def to_json(self) -> dict[str, object]:
        """The record as a JSON object of the trace format (fields that are None are left out)."""
        out: dict[str, object] = {"vcpu": self.vcpu, "op": self.op, "gva": hex(self.gva)}
        if self.op != "invlpg":
            out["size"] = self.size
        for name in ("value", "gpa", *_CREGS):
            v = getattr(self, name)
            if v is not None:
                out[name] = hex(v)
        for name in ("cpl", "phase", "region", "seq"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        return out


# -- reading ---------------------------------------------------------------------------------------
def _error(where: str, line: int, fieldname: str, shown: str, rule: str) -> ScenarioError:
    err = ScenarioError(f"{where} line {line}: {fieldname}{shown}: {rule}")
    err.line, err.field, err.rule = line, fieldname, rule  # type: ignore[attr-defined]
    return err


def _show(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return "=" + (text if len(text) <= 60 else text[:57] + "...")


def _hex(obj: dict, name: str, where: str, line: int, bits: int) -> int | None:
    raw = obj.get(name)
    if raw is None:
        return None
    if not isinstance(raw, str) or not _HEX.match(raw):
        raise _error(where, line, name, _show(raw), "a hex value is a string '0x' followed by hex digits")
    value = int(raw, 16)
    if value >> bits:
        raise _error(where, line, name, _show(raw), f"the value does not fit in {bits} bits")
    return value


def _int(obj: dict, name: str, where: str, line: int, lo: int, hi: int | None, rule: str) -> int | None:
    raw = obj.get(name)
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < lo or (hi is not None and raw > hi):
        raise _error(where, line, name, _show(raw), rule)
    return raw


def _str(obj: dict, name: str, where: str, line: int) -> str | None:
    raw = obj.get(name)
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw:
        raise _error(where, line, name, _show(raw), "a label is a non-empty string")
    return raw


def parse_record(obj: object, line: int = 0, where: str = "trace") -> TraceRecord:
    """Validate one decoded JSON object and turn it into a TraceRecord."""
    if not isinstance(obj, dict):
        raise _error(where, line, "record", _show(obj), "each line holds one JSON object")
    for name in obj:
        if name not in FIELDS:
            raise _error(where, line, str(name), "", f"not a field of the trace format (fields: {', '.join(FIELDS)})")
    for name in ("vcpu", "op", "gva"):
        if name not in obj:
            raise _error(where, line, name, "", "this field is required")
    vcpu = _int(obj, "vcpu", where, line, 0, MAX_VCPU_INDEX, f"a vCPU index is an integer from 0 to {MAX_VCPU_INDEX}")
    op = obj["op"]
    if op not in OPS:
        raise _error(where, line, "op", _show(op), f"an operation is one of {', '.join(OPS)}")
    gva = _hex(obj, "gva", where, line, 64)
    if op == "invlpg":
        for name in ("size", "value", "gpa"):
            if name in obj:
                raise _error(where, line, name, _show(obj[name]), "an invlpg record has no size, value or gpa")
        size = 0
    else:
        if "size" not in obj:
            raise _error(where, line, "size", "", "an access needs a size")
        size = _int(obj, "size", where, line, 1, 16, "an access is 1, 2, 4, 8 or 16 bytes")
        if size not in SIZES:
            raise _error(where, line, "size", _show(obj["size"]), "an access is 1, 2, 4, 8 or 16 bytes")
    value = _hex(obj, "value", where, line, 8 * size) if size else None
    gpa = _hex(obj, "gpa", where, line, _GPA_BITS)
    if gpa is not None and (gpa ^ gva) & 0xFFF:
        raise _error(where, line, "gpa", _show(obj["gpa"]), f"gva {gva:#x} and gpa must share the page offset")
    regs = {name: _hex(obj, name, where, line, 64) for name in _CREGS}
    cpl = _int(obj, "cpl", where, line, 0, 3, "CPL is 0, 1, 2 or 3")
    seq = _int(obj, "seq", where, line, 0, 2**63 - 1, "a sequence number is an integer from 0 to 2^63-1")
    return TraceRecord(vcpu, op, gva, size, value, gpa, regs["cr0"], regs["cr3"], regs["cr4"], regs["efer"], cpl,
                       _str(obj, "phase", where, line), _str(obj, "region", where, line), seq, line)


def _decode(text: str, line: int, where: str) -> object:
    if len(text) > MAX_LINE:
        raise _error(where, line, "record", "", f"a record is at most {MAX_LINE:,} characters")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip()):
            raise _error(where, line, "record", "", "the line is truncated (the JSON object is not closed)") from None
        raise _error(where, line, "record", "", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise _error(where, line, "record", "", "not valid JSON (nested too deeply)") from None
    except ValueError as exc:                      # e.g. an integer of thousands of digits
        raise _error(where, line, "record", "", f"not valid JSON ({str(exc)[:80]})") from None


def _lines(source: str | os.PathLike | IO[str] | Iterable[str]) -> tuple[Iterable[str], str, IO[str] | None]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            fh: IO[str] = gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else \
                open(path, encoding="utf-8")  # noqa: SIM115 - closed by read_trace
        except OSError as exc:
            raise ScenarioError(f"{path}: cannot open the trace ({exc.strerror})") from None
        return fh, path, fh
    return source, getattr(source, "name", "trace"), None


def read_trace(source: str | os.PathLike | IO[str] | Iterable[str]) -> Iterator[TraceRecord]:
    """Stream the records of a trace (a path, ``.gz`` allowed, an open text file or lines of text)."""
    lines, where, owned = _lines(source)
    try:
        first = True
        for n, text in enumerate(lines, 1):
            if not text.strip():
                continue
            obj = _decode(text, n, where)
            if first and isinstance(obj, dict) and "format" in obj:
                first = False
                if obj.get("format") != TRACE_FORMAT:
                    raise _error(where, n, "format", _show(obj.get("format")), f"the header names {TRACE_FORMAT!r}")
                if obj.get("version") != TRACE_VERSION:
                    raise _error(where, n, "version", _show(obj.get("version")),
                                 f"this reader understands version {TRACE_VERSION}")
                continue
            first = False
            yield parse_record(obj, n, where)
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{where}: not UTF-8 text ({exc.reason})") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise ScenarioError(f"{where}: the file ends early or is damaged ({exc})") from None
    finally:
        if owned is not None:
            owned.close()


def write_trace(records: Iterable[TraceRecord], dest: str | os.PathLike | IO[str], *,
                description: str | None = None) -> int:
    """Write a header and the records as JSON Lines (``.gz`` paths are compressed); returns the count."""
    if isinstance(dest, (str, os.PathLike)):
        path = os.fspath(dest)
        with (gzip.open(path, "wt", encoding="utf-8") if path.endswith(".gz") else
              open(path, "w", encoding="utf-8")) as fh:
            return write_trace(records, fh, description=description)
    header: dict[str, object] = {"format": TRACE_FORMAT, "version": TRACE_VERSION}
    if description:
        header["description"] = description
    dest.write(json.dumps(header) + "\n")
    n = 0
    for rec in records:
        dest.write(json.dumps(rec.to_json(), separators=(", ", ": ")) + "\n")
        n += 1
    return n


def trace_text(records: Iterable[TraceRecord], description: str | None = None) -> str:
    buf = io.StringIO()
    write_trace(records, buf, description=description)
    return buf.getvalue()


# -- replay ----------------------------------------------------------------------------------------
class RecordedValues:
    """Stands in for every device of a recording: it answers each read with the value the recorded
    guest read.  Register it as an in-kernel io-bus device (`vm.register_io_device`) and/or use it
    as the VMM's KVM_EXIT_MMIO handler (`vm.mmio_handler`); `replay` tells it which access is in
    flight.  It also checks the routing: every piece must arrive at the access's recorded gpa
    (`misrouted` counts those that do not) and written data must be the recorded data
    (`write_mismatches`).
    """

    def __init__(self) -> None:
        self._data = b""
        self._gpa = -1
        self._page_offset = 0
        self._first = 0
        self.delivered = 0            # pieces that reached a device
        self.misrouted = 0            # ... at an address other than the recorded gpa
        self.write_mismatches = 0
        self.unexpected = 0           # pieces that fall outside the access in flight

    def begin(self, rec: TraceRecord | None) -> None:
        self._data = b"" if rec is None or rec.value is None else rec.value.to_bytes(rec.size, "little")
        if rec is not None:
            self._page_offset = rec.gva & 0xFFF
            self._first = min(rec.size, 0x1000 - self._page_offset)
            self._gpa = -1 if rec.gpa is None else rec.gpa
        else:
            self._gpa = -1

    def _offset(self, addr: int) -> int:
        """Where the piece at guest-physical `addr` starts inside the access in flight: pieces on the
        access's first page keep its page offset; a page-crossing access continues at offset 0."""
        self.delivered += 1
        off = addr & 0xFFF
        if off >= self._page_offset:
            if self._gpa >= 0 and addr >> 12 != self._gpa >> 12:
                self.misrouted += 1
            return off - self._page_offset
        return self._first + off

    def read(self, addr: int, length: int) -> int | None:
        off = self._offset(addr)
        if not self._data:
            return (1 << (8 * length)) - 1       # nothing recorded: a floating bus reads all ones
        piece = self._data[off:off + length]
        if len(piece) != length:
            self.unexpected += 1
            return (1 << (8 * length)) - 1
        return int.from_bytes(piece, "little")

    def write(self, addr: int, length: int, value: int) -> bool:
        off = self._offset(addr)
        if self._data and self._data[off:off + length] != value.to_bytes(length, "little"):
            self.write_mismatches += 1
        return True

    def __call__(self, exit_: MmioExit) -> int | None:
        if exit_.is_write:
            self.write(exit_.phys_addr, exit_.len, exit_.value)
            return None
        return self.read(exit_.phys_addr, exit_.len)


@dataclass
class ReplaySetup:
    """A VM ready for a replay: its vCPUs (index = the records' ``vcpu``) and the recorded-value
    oracle.  If the VM has no KVM_EXIT_MMIO handler yet, the oracle becomes it."""

    vm: VM
    vcpus: list[Vcpu]
    values: RecordedValues = field(default_factory=RecordedValues)

    def __post_init__(self) -> None:
        if self.vm.mmio_handler is None:
            self.vm.mmio_handler = self.values


@dataclass
class PhaseResult:
    """What one phase (or the whole replay) did: record counts and the counters that moved, summed
    over the vCPUs (``stats``: KVM's vCPU stats, ``counters``: the model's, ``vm_stats``: KVM's VM
    stats)."""

    phase: str | None
    records: int = 0
    accesses: int = 0
    mmio_accesses: int = 0        # accesses whose record names a device region
    mmio_full_path: int = 0       # ... during which KVM took the full fault path (pf_taken moved)
    reads: int = 0
    writes: int = 0
    invlpgs: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    vm_stats: dict[str, int] = field(default_factory=dict)

    def metric(self, where: str, name: str) -> int:
        return {"stats": self.stats, "counters": self.counters, "vm": self.vm_stats}[where].get(name, 0)


@dataclass
class ReplayResult:
    phases: list[PhaseResult]
    total: PhaseResult
    faults: list[tuple[int, int | None, GuestFault]]          # (line, seq, fault) of the first few
    fault_count: int
    value_mismatches: list[tuple[int, int | None, int, int | None]]   # (line, seq, recorded, seen)
    mismatch_count: int
    values_checked: int
    write_mismatches: int             # device writes whose data differed from the record
    misrouted: int                    # device pieces at a gpa other than the record's
    undelivered: int                  # device-region accesses that reached no device (e.g. RAM)
    unknown_writes: int

    def phase(self, name: str | None) -> PhaseResult:
        for p in self.phases:
            if p.phase == name:
                return p
        raise KeyError(name)


def _totals(setup: ReplaySetup) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    stats: dict[str, int] = {}
    counters: dict[str, int] = {}
    for v in setup.vcpus:
        for k, n in v.stats.items():
            stats[k] = stats.get(k, 0) + n
        for k, n in v.counters.items():
            counters[k] = counters.get(k, 0) + n
    return stats, counters, dict(setup.vm.stats)


def _add(into: dict[str, int], after: dict[str, int], before: dict[str, int]) -> None:
    for k, n in after.items():
        d = n - before.get(k, 0)
        if d:
            into[k] = into.get(k, 0) + d


def replay(vm_setup: ReplaySetup | Callable[[], ReplaySetup], records: Iterable[TraceRecord], *,
           limit: int | None = None, check_values: bool = True, keep: int = 20,
           progress: Callable[[float], None] | None = None) -> ReplayResult:
    """Run `records` in order, each on its vCPU, and count what KVM did per phase.

    `limit` stops after that many accesses (invlpg records do not count).  Reads whose record
    carries a value are checked against what the guest saw (`value_mismatches`, first `keep` kept);
    guest faults are collected the same way (a faithful replay of a real guest has none).
    `progress(fraction)` is called every 1,000 records when `records` has a length.
    """
    total = len(records) if progress is not None and hasattr(records, "__len__") else 0  # type: ignore[arg-type]
    setup = vm_setup() if callable(vm_setup) else vm_setup
    vcpus = setup.vcpus
    values = setup.values
    phases: dict[str | None, PhaseResult] = {}
    order: list[PhaseResult] = []
    faults: list[tuple[int, int | None, GuestFault]] = []
    mismatches: list[tuple[int, int | None, int, int | None]] = []
    fault_count = mismatch_count = checked = unknown_writes = undelivered = 0
    start = _totals(setup)
    mark = start
    cur: PhaseResult | None = None
    done = 0

    def close(p: PhaseResult | None) -> None:
        nonlocal mark
        now = _totals(setup)
        if p is not None:
            _add(p.stats, now[0], mark[0])
            _add(p.counters, now[1], mark[1])
            _add(p.vm_stats, now[2], mark[2])
        mark = now

    for index, rec in enumerate(records, 1):
        if limit is not None and done >= limit and rec.op != "invlpg":
            break
        if total and index % 1000 == 0:
            progress(index / total)  # type: ignore[misc]
        if cur is None or rec.phase != cur.phase:
            close(cur)
            cur = phases.get(rec.phase)
            if cur is None:
                cur = phases[rec.phase] = PhaseResult(rec.phase)
                order.append(cur)
        if not 0 <= rec.vcpu < len(vcpus):        # (a negative index would pick a vCPU from the end)
            err = ScenarioError(f"replay {_at(rec, index)}: vcpu={rec.vcpu}: the VM has {len(vcpus)} vCPUs")
            err.line, err.field, err.rule = rec.line, "vcpu", f"the VM has {len(vcpus)} vCPUs"  # type: ignore
            raise err
        vcpu = vcpus[rec.vcpu]
        cur.records += 1
        if rec.has_sregs:
            _apply_regs(vcpu, rec)
        if rec.op == "invlpg":
            vcpu.invlpg(rec.gva)
            cur.invlpgs += 1
            continue
        done += 1
        cur.accesses += 1
        values.begin(rec)
        delivered = values.delivered
        stats = vcpu.stats
        taken = stats["pf_taken"]
        try:
            if rec.op == "write":
                cur.writes += 1
                if rec.value is None:
                    unknown_writes += 1
                r = vcpu.access(rec.gva, rec.size, "write", rec.value or 0, cpl=rec.cpl)
            else:
                cur.reads += 1
                r = vcpu.access(rec.gva, rec.size, rec.op, cpl=rec.cpl)
        except KvmmuError as exc:
            raise ScenarioError(f"replay {_at(rec, index)}: {exc}") from exc
        if rec.region is not None:
            cur.mmio_accesses += 1
            if stats["pf_taken"] != taken:
                cur.mmio_full_path += 1
            if values.delivered == delivered:
                undelivered += 1
        if r.fault is not None:
            fault_count += 1
            if len(faults) < keep:
                faults.append((rec.line, rec.seq, r.fault))
        elif check_values and rec.op != "write" and rec.value is not None:
            checked += 1
            if r.value != rec.value:
                mismatch_count += 1
                if len(mismatches) < keep:
                    mismatches.append((rec.line, rec.seq, rec.value, r.value))
    values.begin(None)
    close(cur)
    total = PhaseResult(None)
    for p in order:
        for name in ("records", "accesses", "mmio_accesses", "mmio_full_path", "reads", "writes", "invlpgs"):
            setattr(total, name, getattr(total, name) + getattr(p, name))
    end = _totals(setup)
    _add(total.stats, end[0], start[0])
    _add(total.counters, end[1], start[1])
    _add(total.vm_stats, end[2], start[2])
    return ReplayResult(order, total, faults, fault_count, mismatches, mismatch_count, checked,
                        values.write_mismatches, values.misrouted, undelivered, unknown_writes)


def _at(rec: TraceRecord, index: int) -> str:
    """How an error names a record: its line in the trace file (else its position in the stream)."""
    at = f"line {rec.line}" if rec.line else f"record {index}"
    return at if rec.seq is None else f"{at} (seq {rec.seq})"


def _apply_regs(vcpu: Vcpu, rec: TraceRecord) -> None:
    """cr0/cr4/efer changes: KVM_SET_SREGS; a cr3 change alone: the guest's MOV to CR3."""
    mode = {n: getattr(rec, n) for n in ("cr0", "cr4", "efer")}
    if any(v is not None and v != getattr(vcpu, n) for n, v in mode.items()):
        try:
            vcpu.set_sregs(cr0=rec.cr0, cr3=rec.cr3, cr4=rec.cr4, efer=rec.efer)
        except KvmmuError as exc:
            raise ScenarioError(f"replay line {rec.line}: control registers refused: {exc}") from exc
    elif rec.cr3 is not None and rec.cr3 != vcpu.cr3:
        vcpu.write_cr3(rec.cr3)


__all__ = [
    "ACCESS_OPS", "FIELDS", "OPS", "SIZES", "TRACE_FORMAT", "TRACE_VERSION", "PhaseResult", "RecordedValues",
    "ReplayResult", "ReplaySetup", "TraceRecord", "parse_record", "read_trace", "replay", "trace_text",
    "write_trace",
]
