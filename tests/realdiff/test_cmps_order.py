"""The CPU's CMPS operand order is a property of the host CPU (kvmmu.realdiff.cmps_order): the kvm-pvm
profile measures it on the running machine, and the model's CPU follows what the profile says."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvmmu.kvm.profiles import get_profile
from kvmmu.real import available, unavailable_reason
from kvmmu.realdiff.cmps_order import PREFIXES, SIZES, host_cmps_source_first, probe_program, source_first_forms
from kvmmu.report.realdiff import run_model, run_real

needs_kvm = pytest.mark.skipif(not available(), reason=f"needs a usable /dev/kvm: {unavailable_reason()}")
RSI_PAGE, RDI_PAGE = 0x60_0000, 0x60_1000
FORMS = [(p, s) for p in PREFIXES for s in SIZES]


def _model_cr2s(forms: frozenset[tuple[str, int]]) -> list[int]:
    profile = replace(get_profile("kvm-pvm"), cmps_source_first=forms)
    return [f.cr2 for f in run_model(probe_program(), profile).faults]   # type: ignore[arg-type]


def test_source_first_forms_reads_the_fault_log() -> None:
    cr2s = [RSI_PAGE if form == ("repe", 1) else RDI_PAGE for form in FORMS]
    assert source_first_forms(cr2s) == {("repe", 1)}
    with pytest.raises(ValueError, match="logged 2 faults, expected 12"):
        source_first_forms(cr2s[:2])


@pytest.mark.parametrize("forms", [frozenset(), frozenset({("repe", 1)}), frozenset(FORMS)])
def test_model_cpu_reads_the_operand_the_profile_names(forms: frozenset[tuple[str, int]]) -> None:
    # Both pages are not present: the CPU's first read faults, so CR2 is the operand read first.
    assert _model_cr2s(forms) == [RSI_PAGE if form in forms else RDI_PAGE for form in FORMS]


@needs_kvm
def test_kvm_pvm_profile_uses_the_order_measured_here() -> None:
    real = [f.cr2 for f in run_real(probe_program()).faults]      # type: ignore[arg-type]
    measured, source = host_cmps_source_first()
    assert source == "measured on /dev/kvm"
    assert source_first_forms(real) == measured
    assert [f.cr2 for f in run_model(probe_program()).faults] == real   # type: ignore[arg-type]
