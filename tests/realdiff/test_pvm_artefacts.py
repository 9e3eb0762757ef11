"""kvm_pvm's own behaviour, which belongs to the kvm-pvm host profile only (docs/real-kvm.md, "The
kvm-pvm profile").  Expected values are measurements of the real host (corpus deliveries.py and
upper_half.py through run_real), re-measured by test_the_real_host where /dev/kvm is kvm_pvm; the
same programs with the profile's switch turned off show the SDM's (or a plain KVM's) behaviour."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from kvmmu.kvm.profiles import PROFILES
from kvmmu.real import available, unavailable_reason
from kvmmu.realdiff import load_programs, run_model, run_real

CORPUS = Path(__file__).parent / "corpus"
PROGRAMS = {p.name: p for p in load_programs([CORPUS / "deliveries.py", CORPUS / "upper_half.py"])}
PVM = PROFILES["kvm-pvm"]
needs_pvm = pytest.mark.skipif(not (available() and os.path.exists("/sys/module/kvm_pvm")),
                               reason=f"measured on a kvm_pvm host ({unavailable_reason() or 'not kvm_pvm'})")

# program: (stops, exits, KVM_EXIT_MMIOs, fault vectors logged), measured on the real host.
MEASURED = {
    "iretq_same_ring_cpl0": (["hlt"], 1, 0, []),
    "pf_handler_halts_cpl0": (["hlt"], 2, 0, [14]),
    "pf_handler_halts_cpl3": (["hlt"], 3, 0, [14]),
    "ud_gate_not_present_cpl0": (["hlt"], 2, 0, [8]),
    "ud_gate_not_present_cpl3": (["hlt"], 3, 0, [8]),
    "bp_gate_not_present_cpl3": (["hlt"], 3, 0, [8]),
    "gp_triple_fault_cpl0": (["shutdown"], 2, 0, []),
    "gp_triple_fault_cpl3": (["shutdown"], 3, 0, []),
    "ud_triple_fault_cpl3": (["shutdown"], 3, 0, []),
    "de_triple_fault_cpl3": (["shutdown"], 3, 0, []),
    "frame_on_mmio_stack_cpl0": (["shutdown"], 2, 0, []),
    "frame_on_mmio_stack_cpl3": (["shutdown"], 3, 0, []),
    "ud0_cpl0": (["internal_error"], 1, 0, []),
    "ud0_cpl3": (["hlt"], 3, 0, [6]),
    "upper_half_cpl3": (["hlt"], 16, 0, [14, 14, 14]),
}


def _seen(obs: object) -> tuple[list[str], int, int, list[int]]:
    return (obs.stops, obs.counters["exits"], len(obs.mmio),  # type: ignore[attr-defined]
            [f.vector for f in obs.faults])  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_the_kvm_pvm_profile_does_what_the_real_host_does(name: str) -> None:
    assert _seen(run_model(PROGRAMS[name])) == MEASURED[name]


def test_slot_256_faults_only_in_the_kvm_pvm_profile() -> None:
    obs = run_model(PROGRAMS["upper_half_cpl3"])
    assert [f.cr2 for f in obs.faults] == [0xFFFF_8000_0000_0000, 0xFFFF_8000_0000_0010, 0xFFFF_8000_0000_0008]
    assert [f.error_code for f in obs.faults] == [0x4, 0x6, 0x14]       # P and RSVD masked by the program
    plain = run_model(PROGRAMS["upper_half_cpl3"], dataclasses.replace(PVM, user_slot256_faults=False))
    assert plain.faults == [] and plain.memory[0x60_0000][:8] == b"\x01" * 8
    assert run_model(PROGRAMS["upper_half_cpl3"], "vmx-shadow").faults == []


def test_a_benign_exception_whose_delivery_faults_is_delivered_serially_per_the_sdm() -> None:
    """SDM Vol. 3A 6.15 (table 6-5): #UD then #GP (the gate not present, error 6*8+2) delivers the
    #GP; kvm_pvm makes it #DF.  A contributory pair is #DF either way."""
    sdm = dataclasses.replace(PVM, delivery_fault_is_df=False)
    obs = run_model(PROGRAMS["ud_gate_not_present_cpl0"], sdm)
    assert [(f.vector, f.error_code) for f in obs.faults] == [(13, 6 * 8 + 2)]
    assert [f.vector for f in run_model(PROGRAMS["pf_gate_not_present_cpl0"], sdm).faults] == [8]


def test_a_frame_on_mmio_is_written_to_the_device_by_a_cpu() -> None:
    """A CPU (vmx-shadow: hardware delivery) pushes the frame like any store: MMIO writes."""
    obs = run_model(PROGRAMS["frame_on_mmio_stack_cpl0"], "vmx-shadow")
    assert len(obs.mmio) >= 5 and all(m.write for m in obs.mmio[:5])


@needs_pvm
@pytest.mark.realkvm
def test_the_real_host() -> None:
    for name, want in MEASURED.items():
        obs = run_real(PROGRAMS[name])
        seen = _seen(obs)
        assert (seen[0], seen[2], seen[3]) == (want[0], want[2], want[3]), name
        assert seen[1] >= want[1], name          # host interrupts only add exits
