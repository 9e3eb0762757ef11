"""Export a traced run as a Perfetto trace (`.pftrace`, the protobuf format ui.perfetto.dev opens).

Each VM is a process ("kvmmu VM <name>", pid 4000 + 100 * i), each vCPU a thread ("CPU n/KVM").
Every event is an instant on its vCPU's track, named after the tracepoint, with the TP_printk text
and the raw fields as debug annotations; the time between a `kvm_exit` and the next `kvm_entry` is a
slice named after the exit reason, so the timeline shows where the vCPU was in KVM.  Written with
Perfetto's own protobuf schema (the `perfetto` package), which also reads it back in the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ScenarioError
from ..kvm.tracepoints import format_event, subsystem
from .kvmstat import exit_label
from .tracefmt import Capture, task

_SEQ_ID = 1


def _schema() -> Any:  # the optional dependency is imported only when an export is asked for;
    # Any: perfetto's generated protobuf module ships no type information
    try:
        from perfetto.protos.perfetto.trace import perfetto_trace_pb2
    except ImportError as e:        # pragma: no cover - the dev extra installs it
        raise ScenarioError("--export needs the Perfetto schema: pip install 'kvmmu[trace]' "
                            f"(perfetto and protobuf): {e}") from None
    return perfetto_trace_pb2


def to_perfetto(cap: Capture) -> bytes:
    pb = _schema()
    trace = pb.Trace()
    vcpus = sorted({(r.vm, r.vcpu) for r in cap.records})
    for vm in sorted({v for v, _ in vcpus}):
        pkt = trace.packet.add()
        pkt.track_descriptor.uuid = 1 + vm
        pkt.track_descriptor.process.pid = 4000 + 100 * vm
        pkt.track_descriptor.process.process_name = f"kvmmu VM {cap.vm_names[vm]}"
    for vm, vc in vcpus:
        comm, tid = task(vm, vc)
        pkt = trace.packet.add()
        td = pkt.track_descriptor
        td.uuid = 1000 + tid
        td.parent_uuid = 1 + vm
        td.thread.pid = 4000 + 100 * vm
        td.thread.tid = tid
        td.thread.thread_name = comm
    in_exit: set[tuple[int, int]] = set()
    for r in cap.sorted():
        track = 1000 + task(r.vm, r.vcpu)[1]
        ts = int(round(r.t_s * 1e9))
        if r.name == "kvm_entry" and (r.vm, r.vcpu) in in_exit:
            _event(trace, pb, ts, track, pb.TrackEvent.TYPE_SLICE_END)
            in_exit.discard((r.vm, r.vcpu))
        ev = _event(trace, pb, ts, track, pb.TrackEvent.TYPE_INSTANT, r.name, subsystem(r.name))
        ann = ev.debug_annotations.add()
        ann.name = "print"
        ann.string_value = format_event(r.name, r.fields)
        for k, v in r.fields.items():
            a = ev.debug_annotations.add()
            a.name = k
            if isinstance(v, bool):
                a.bool_value = v
            elif isinstance(v, int) and 0 <= v < 1 << 64:
                a.uint_value = v
            elif isinstance(v, int):
                a.int_value = v
            else:
                a.string_value = v.hex() if isinstance(v, bytes) else str(v)
        if r.name == "kvm_exit":
            if (r.vm, r.vcpu) in in_exit:
                _event(trace, pb, ts, track, pb.TrackEvent.TYPE_SLICE_END)
            _event(trace, pb, ts, track, pb.TrackEvent.TYPE_SLICE_BEGIN, f"kvm_exit({exit_label(r.fields)})", "kvm")
            in_exit.add((r.vm, r.vcpu))
    return trace.SerializeToString()


def _event(trace: Any, pb: Any, ts: int, track: int, kind: int, name: str | None = None,
           category: str | None = None) -> Any:
    pkt = trace.packet.add()
    pkt.timestamp = ts
    pkt.trusted_packet_sequence_id = _SEQ_ID
    ev = pkt.track_event
    ev.type = kind
    ev.track_uuid = track
    if name is not None:
        ev.name = name
    if category is not None:
        ev.categories.append(category)
    return ev


def write_perfetto(cap: Capture, path: str | Path) -> int:
    """Write the trace; returns the number of bytes written."""
    data = to_perfetto(cap)
    p = Path(path)
    if p.is_dir():
        raise ScenarioError(f"--export {path}: is a directory; name the file to write (e.g. run.pftrace)")
    if not p.parent.is_dir():
        raise ScenarioError(f"--export {path}: the directory {p.parent} does not exist")
    try:
        p.write_bytes(data)
    except OSError as e:
        raise ScenarioError(f"--export {path}: cannot write: {e.strerror}") from None
    return len(data)
