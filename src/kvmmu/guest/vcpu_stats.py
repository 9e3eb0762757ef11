"""KVM's vCPU stats and the model's counters summed over a VM's vCPUs: what a replay's phases and a
scenario's results report per VM (one place for both; light enough for the scenario to import)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kvm.vcpu import Vcpu


def vcpu_totals(vcpus: Iterable[Vcpu]) -> tuple[dict[str, int], dict[str, int]]:
    """(KVM's vCPU stats, the model's counters), each summed over `vcpus`."""
    stats: dict[str, int] = {}
    counters: dict[str, int] = {}
    for v in vcpus:
        for k, n in v.stats.items():
            stats[k] = stats.get(k, 0) + n
        for k, n in v.counters.items():
            counters[k] = counters.get(k, 0) + n
    return stats, counters


__all__ = ["vcpu_totals"]
