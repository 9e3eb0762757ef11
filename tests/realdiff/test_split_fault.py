"""Guest-visible KVM departures from the SDM, measured on the real /dev/kvm (docs/architecture/deviations.md,
"Where KVM lets a guest tell").  On this kvm_pvm host CPL0 code runs in KVM's emulator and CPL3 code
on the CPU over KVM's shadow MMU, so one program at both rings shows both sides:

- split_fault.py: a page-crossing store whose second page faults.  KVM's emulator has written the
  first page before the #PF (CPL0); the CPU writes nothing (CPL3).
- stale_after_pf.py: a #PF with P=0 injected from KVM's emulator leaves the page's unsync spte, so at
  CPL3 the next load succeeds where the SDM says the #PF invalidated the page.

The host profiles run the model with kvm_deviations=True and must do what the real host does; with
kvm_deviations=False the model follows the SDM.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvmmu.kvm.profiles import PROFILES
from kvmmu.real import available, unavailable_reason
from kvmmu.real.hostinfo import kvm_pvm_mismatch
from kvmmu.realdiff import load_programs, run_model, run_real

CORPUS = Path(__file__).parent / "corpus"
PROGRAMS = {p.name: p for p in load_programs([CORPUS / "split_fault.py", CORPUS / "stale_after_pf.py"])}
DATA = 0x60_0000
SDM_PROFILE = dataclasses.replace(PROFILES["kvm-pvm"], kvm_deviations=False)
# (program, bytes at DATA on the KVM host, #PFs on the KVM host, bytes and #PFs under the SDM)
CASES = {
    "split_store_fault_cpl0": ("bbbbbbbb00000000bbbbbbbb00000000", 2, "11111111000000002222222200000000", 2),
    "split_store_fault_cpl3": ("11111111000000002222222200000000", 2, "11111111000000002222222200000000", 2),
    "stale_after_pf_cpl0": ("44444444444444440000000000000000", 2, "44444444444444440000000000000000", 2),
    "stale_after_pf_cpl3": ("44444444444444444444444444444444", 1, "44444444444444440000000000000000", 2),
}
needs_pvm = [pytest.mark.skipif(not available(), reason=f"needs a usable /dev/kvm: {unavailable_reason()}"),
             pytest.mark.skipif(kvm_pvm_mismatch() is not None, reason=str(kvm_pvm_mismatch()))]


@pytest.mark.parametrize("name", sorted(CASES))
@needs_pvm[0]
@needs_pvm[1]
def test_the_real_host(name: str) -> None:
    obs = run_real(PROGRAMS[name])
    assert (obs.memory[DATA][:16].hex(), len(obs.faults)) == CASES[name][:2]


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_kvm_pvm_profile_does_what_the_real_host_does(name: str) -> None:
    obs = run_model(PROGRAMS[name], "kvm-pvm")
    assert (obs.memory[DATA][:16].hex(), len(obs.faults)) == CASES[name][:2]


@pytest.mark.parametrize("name", sorted(CASES))
def test_without_kvm_deviations_the_model_follows_the_sdm(name: str) -> None:
    obs = run_model(PROGRAMS[name], SDM_PROFILE)
    assert (obs.memory[DATA][:16].hex(), len(obs.faults)) == CASES[name][2:]
