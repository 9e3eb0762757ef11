"""Recorded guest access streams: `replay` runs a trace's records on a VM's vCPUs and counts what
KVM did per phase.  The format, its record, reader and writer are `kvmmu.guest.trace_format`
(re-exported here, so one import serves both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import KvmmuError, ScenarioError
from .trace_format import (
    ACCESS_OPS,
    FIELDS,
    OPS,
    SIZES,
    TRACE_FORMAT,
    TRACE_VERSION,
    ControlRegs,
    TraceError,
    TraceRecord,
    parse_record,
    read_trace,
    trace_text,
    write_trace,
)
from .vcpu_stats import vcpu_totals

if TYPE_CHECKING:
    from ..kvm.emulate import MmioExit
    from ..kvm.vcpu import GuestFault, Vcpu
    from ..kvm.vm import VM


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
    stats, counters = vcpu_totals(setup.vcpus)
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
    total = len(records) if progress is not None and isinstance(records, Sized) else 0
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
        if total and index % 1000 == 0 and progress is not None:
            progress(index / total)
        if cur is None or rec.phase != cur.phase:
            close(cur)
            cur = phases.get(rec.phase)
            if cur is None:
                cur = phases[rec.phase] = PhaseResult(rec.phase)
                order.append(cur)
        if not 0 <= rec.vcpu < len(vcpus):        # (a negative index would pick a vCPU from the end)
            rule = f"the VM has {len(vcpus)} vCPUs"
            raise TraceError(f"replay {_at(rec, index)}: vcpu={rec.vcpu}: {rule}", rec.line, "vcpu", rule)
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
    whole = PhaseResult(None)
    for p in order:
        for name in ("records", "accesses", "mmio_accesses", "mmio_full_path", "reads", "writes", "invlpgs"):
            setattr(whole, name, getattr(whole, name) + getattr(p, name))
    end = _totals(setup)
    _add(whole.stats, end[0], start[0])
    _add(whole.counters, end[1], start[1])
    _add(whole.vm_stats, end[2], start[2])
    return ReplayResult(order, whole, faults, fault_count, mismatches, mismatch_count, checked,
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
    "ACCESS_OPS", "FIELDS", "OPS", "SIZES", "TRACE_FORMAT", "TRACE_VERSION", "ControlRegs", "PhaseResult",
    "RecordedValues", "ReplayResult", "ReplaySetup", "TraceError", "TraceRecord", "parse_record", "read_trace",
    "replay", "trace_text", "write_trace",
]
