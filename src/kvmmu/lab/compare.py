"""The offline comparison: the model under a host profile against recorded real observations."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ScenarioError
from ..guest.runtime import Program, build
from ..real.cpuid import guest_paging_as
from ..realdiff import ProgramReport, compare, load_programs, run_model
from .record import observation_from_json


def check_profile(results: dict[str, Any], profile: str) -> None:
    """A recorded file names the profile it was captured for; comparing it under another is refused."""
    recorded = results.get("profile")
    if recorded and recorded != profile:
        raise ScenarioError(f"--profile {profile!r} does not match the recorded configuration "
                            f"({results.get('config')}, mmio_caching={results.get('mmio_caching')}: "
                            f"profile {recorded!r})")


def load_recorded_programs(paths: Iterable[str | Path], results: dict[str, Any]) -> list[Program]:
    """The corpus as the recording machine loaded it: a program that takes its addresses from the
    guest width (``host_guest_paging``, e.g. phys_width.py) gets the width the file records
    (``guest_paging``: what KVM_GET_SUPPORTED_CPUID gave the guests there), not this machine's."""
    paging = results.get("guest_paging") or {}
    if not isinstance(paging.get("maxphyaddr"), int):
        return load_programs(paths)
    with guest_paging_as(paging["maxphyaddr"], bool(paging.get("gbpages")),
                         f"recorded ({paging.get('source', 'lab')})"):
        return load_programs(paths)


def diff_recorded(programs: list[Program], results: dict[str, Any], profile: str) -> list[ProgramReport]:
    """One report per program; a program the file does not hold is compared with nothing (model-only)."""
    check_profile(results, profile)
    recorded = results.get("programs", {})
    reports = []
    for program in programs:
        image = build(program)
        model = run_model(program, profile, image)
        entry = recorded.get(program.name)
        if entry is None or "backend" not in entry:
            reports.append(ProgramReport(program, model, None))
            continue
        real = observation_from_json(entry)
        real.backend = f"recorded:{results.get('config')}"
        if entry.get("exits_seen"):
            real.notes.append(f"real exits over {len(entry['exits_seen'])} runs: {entry['exits_seen']} (min kept)")
        reports.append(ProgramReport(program, model, real, compare(program, model, real)))
    return reports


def tally(reports: list[ProgramReport]) -> dict[str, list[str]]:
    """status -> program names."""
    out: dict[str, list[str]] = {}
    for r in reports:
        out.setdefault(r.status, []).append(r.name)
    return out


__all__ = ["check_profile", "diff_recorded", "load_recorded_programs", "tally"]
