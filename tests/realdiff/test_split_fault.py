"""A guest-visible KVM departure from the SDM, measured on the real /dev/kvm: a page-crossing store
whose second page faults.  Where KVM emulates the store (CPL0 on this kvm_pvm host), its emulator has
written the first page before the #PF; where the CPU runs it (CPL3) nothing is written.  The model
does the same with kvm_deviations=True (the host profiles) and follows the SDM by default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmmu.real import available, unavailable_reason
from kvmmu.report.realdiff import load_programs, run_model, run_real

PROGRAMS = {p.name: p for p in load_programs([Path(__file__).parent / "corpus" / "split_fault.py"])}
DATA = 0x60_0000
WRITTEN, UNTOUCHED = "bbbbbbbb00000000bbbbbbbb00000000", "11111111000000002222222200000000"
EXPECTED = {"split_store_fault_cpl0": WRITTEN, "split_store_fault_cpl3": UNTOUCHED}


@pytest.mark.skipif(not available(), reason=f"needs a usable /dev/kvm: {unavailable_reason()}")
@pytest.mark.skipif(not os.path.exists("/sys/module/kvm_pvm"), reason="CPL0 is emulated only on a kvm_pvm host")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_kvm_writes_the_first_page_only_where_it_emulates(name: str) -> None:
    assert run_real(PROGRAMS[name]).memory[DATA][:16].hex() == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_kvm_pvm_profile_does_what_the_real_host_does(name: str) -> None:
    assert run_model(PROGRAMS[name], "kvm-pvm").memory[DATA][:16].hex() == EXPECTED[name]
