"""The kvmmu trace format (JSON Lines) of recorded guest access streams: its record, a validating
reader and a writer.  `kvmmu.guest.trace` re-exports them, with `replay`, which runs the records on
a VM's vCPUs.

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, TypedDict

from ..errors import ScenarioError

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



class ControlRegs(TypedDict, total=False):
    """The control registers a record may carry (TraceRecord's cr0, cr3, cr4 and efer), as keywords."""

    cr0: int
    cr3: int
    cr4: int
    efer: int


class TraceError(ScenarioError):
    """A trace that cannot be used, with the line (0: a record built in memory), the field and the rule."""

    def __init__(self, message: str, line: int = 0, field: str = "", rule: str = "") -> None:
        super().__init__(message)
        self.line, self.field, self.rule = line, field, rule


# -- reading ---------------------------------------------------------------------------------------
def _error(where: str, line: int, fieldname: str, shown: str, rule: str) -> TraceError:
    return TraceError(f"{where} line {line}: {fieldname}{shown}: {rule}", line, fieldname, rule)


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
    if vcpu is None or gva is None:                 # present, but JSON null
        name = "vcpu" if vcpu is None else "gva"
        raise _error(where, line, name, _show(obj[name]), "this field is required")
    if op == "invlpg":
        for name in ("size", "value", "gpa"):
            if name in obj:
                raise _error(where, line, name, _show(obj[name]), "an invlpg record has no size, value or gpa")
        size = 0
    else:
        if "size" not in obj:
            raise _error(where, line, "size", "", "an access needs a size")
        given = _int(obj, "size", where, line, 1, 16, "an access is 1, 2, 4, 8 or 16 bytes")
        if given is None or given not in SIZES:
            raise _error(where, line, "size", _show(obj["size"]), "an access is 1, 2, 4, 8 or 16 bytes")
        size = given
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


__all__ = [
    "ACCESS_OPS", "FIELDS", "MAX_LINE", "MAX_VCPU_INDEX", "OPS", "SIZES", "TRACE_FORMAT", "TRACE_VERSION",
    "ControlRegs", "TraceError", "TraceRecord", "parse_record", "read_trace", "trace_text", "write_trace",
]
