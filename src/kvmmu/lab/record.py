"""Recorded real observations: an `Observation` to JSON and back, and the results file of a lab run.

A results file holds one configuration's run of a corpus::

    {"format": "kvmmu-lab/1", "config": "npt", "mmio_caching": true, "profile": "svm-npt-tdp",
     "kernel": {"release": ..., "version": ...}, "parameters": {"kvm.tdp_mmu": "Y", ...},
     "cpu": "qemu64,+svm,...", "programs": {name: {observation..., "trace": {...}}}}

Guest memory pages are stored zlib-compressed and base64-encoded (most pages are nearly empty).
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path
from typing import Any

from ..errors import ScenarioError
from ..realdiff import FaultRecord, Mmio, Observation

FORMAT = "kvmmu-lab/1"


def observation_to_json(o: Observation) -> dict[str, Any]:
    return {
        "backend": o.backend, "stops": o.stops,
        "mmio": [[m.addr, m.len, int(m.write), m.data.hex()] for m in o.mmio],
        "memory": {f"{gpa:#x}": base64.b64encode(zlib.compress(page, 9)).decode()
                   for gpa, page in sorted(o.memory.items())},
        "faults": [[f.vector, f.error_code, f.cr2, f.rip] for f in o.faults], "fault_count": o.fault_count,
        "counters": o.counters, "extra": o.extra, "regs": o.regs, "per_run": o.per_run, "error": o.error,
        "notes": o.notes, "stats": o.stats,
    }


def observation_from_json(d: dict[str, Any]) -> Observation:
    try:
        return Observation(
            backend=d["backend"], stops=list(d["stops"]),
            mmio=[Mmio(a, n, bool(w), bytes.fromhex(data)) for a, n, w, data in d["mmio"]],
            memory={int(gpa, 16): zlib.decompress(base64.b64decode(page)) for gpa, page in d["memory"].items()},
            faults=[FaultRecord(*f) for f in d["faults"]], fault_count=d["fault_count"],
            counters=dict(d["counters"]), extra=dict(d["extra"]), regs=dict(d["regs"]),
            per_run=[dict(r) for r in d["per_run"]], error=d.get("error"), notes=list(d.get("notes", [])),
            stats=dict(d.get("stats", {})))
    except (KeyError, TypeError, ValueError, zlib.error) as e:
        raise ScenarioError(f"recorded observation is malformed: {type(e).__name__}: {e}") from None


def load_results(path: str | Path) -> dict[str, Any]:
    """A results file, checked for its format; ``programs`` values stay JSON (see `observation_from_json`)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"recorded results {str(p)!r} do not exist") from None
    except json.JSONDecodeError as e:
        raise ScenarioError(f"recorded results {str(p)!r} are not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ScenarioError(f"recorded results {str(p)!r}: format must be {FORMAT!r}")
    return data


def dump_results(data: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(data, separators=(",", ":"), sort_keys=False) + "\n")


__all__ = ["FORMAT", "dump_results", "load_results", "observation_from_json", "observation_to_json"]
