"""The TDP MMU against the real-KVM lab's recorded run (Debian 6.1, npt=1 tdp_mmu=1 mmio_caching=1):
tests/realdiff/lab/npt.json and the lab's MMIO-spte scenarios.  Skipped where the recording is not
part of the checkout.

Only the MMU's counters are compared here (what the TDP MMU decides: full faults, fixed faults, MMIO
sptes, emulations, leaf sptes, shadow zaps), on a plain NPT host of the same guest paging (40 physical
address bits, no 1 GiB pages): the lab's TCG artefacts do not touch them in these programs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmmu.kvm.profiles import HostProfile
from kvmmu.kvm.vm import VM
from kvmmu.realdiff import load_programs, run_model

LAB = Path(__file__).resolve().parents[2] / "realdiff" / "lab"
RECORDED = LAB / "npt.json"
SCENARIOS = LAB / "scenarios"
KEYS = ("mmio_exits", "pf_taken", "pf_fixed", "pf_emulate", "pf_mmio_spte_created", "pages_4k", "pf_guest")

pytestmark = pytest.mark.skipif(not RECORDED.exists() or not SCENARIOS.exists(),
                                reason="the lab's recorded npt run is not in this checkout")


@dataclass(frozen=True)
class _Npt(HostProfile):
    def make_vm(self, host_hugepage_level: int = 1) -> VM:
        return VM(mmu="npt", mmio_caching=self.mmio_caching, tdp_mmu=True, kvm_deviations=True,
                  guest_maxphyaddr=40, guest_gbpages=False, host_hugepage_level=host_hugepage_level)


@pytest.mark.parametrize("name", ["mmio64", "gen_slot_created", "gen_slot_deleted"])
def test_mmio_scenarios_match_the_recorded_counters(name: str) -> None:
    real = json.loads(RECORDED.read_text())["programs"][name]
    prog = next(p for p in load_programs([SCENARIOS]) if p.name == name)
    prof = _Npt(name="npt-tdp", summary="", mmu="npt", mmio_caching="generation", cpl0="native",
                delivery="hardware", guest_maxphyaddr=40, guest_gbpages=False)
    obs = run_model(prog, prof)
    assert {k: obs.counters[k] for k in KEYS} == {k: real["counters"][k] for k in KEYS}
    assert obs.extra["mmu_shadow_zapped"] == real["extra"]["mmu_shadow_zapped"] == 0
