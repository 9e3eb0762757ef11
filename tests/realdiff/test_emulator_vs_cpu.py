"""Where KVM's emulator and the CPU do the same instruction differently, measured on the real
kvm_pvm host (docs/real-kvm.md, "CMPS operand order" and "The top of the lower canonical half").

On this host CPL0 code runs in KVM's emulator and CPL3 code on the CPU, so one corpus program at
both rings shows both sides.  Expected values are the real host's (run_real on /dev/kvm), never the
model's output; the real-host tests re-measure them where /dev/kvm is a kvm_pvm host.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from kvmmu.kvm.profiles import PROFILES
from kvmmu.real import available, unavailable_reason
from kvmmu.realdiff import load_programs, run_model, run_real

CORPUS = Path(__file__).parent / "corpus"
PROGRAMS = {p.name: p for p in load_programs([CORPUS / "cmps.py", CORPUS / "canonical.py"])}
SDM_PROFILE = dataclasses.replace(PROFILES["kvm-pvm"], kvm_deviations=False)
needs_pvm = pytest.mark.skipif(not (available() and os.path.exists("/sys/module/kvm_pvm")),
                               reason=f"measured on a kvm_pvm host ({unavailable_reason() or 'not kvm_pvm'})")
BACK, TOP = 0x60_0000, 0x7FFF_FFFF_F000

# CR2 of the two #PFs of cmps_both_fault (RSI, RDI on not-present pages, then swapped): the CPU
# names RDI first, KVM's emulator RSI (measured).
CMPS_CR2 = {"cmps_both_fault_cpl0": [0x600000, 0x601000], "cmps_both_fault_cpl3": [0x601000, 0x600000]}
# (pf_fixed, pages_4k) at CPL3: RSI on RAM / RDI on MMIO leaves the RAM pages to KVM's emulator (only
# the code and stack pages get sptes); RSI on MMIO / RDI on RAM faults both RAM pages in first.
CMPS_CPL3 = {"cmps_ram_mmio_cpl3": (2, 2), "cmps_mmio_ram_cpl3": (3, 3)}


def _cr2s(obs: object) -> list[int]:
    return [f.cr2 for f in obs.faults]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(CMPS_CR2))
def test_cmps_faults_on_rdi_first_on_the_cpu_and_rsi_first_in_kvms_emulator(name: str) -> None:
    assert _cr2s(run_model(PROGRAMS[name])) == CMPS_CR2[name]


@pytest.mark.parametrize("name", sorted(CMPS_CPL3))
def test_cmps_with_one_mmio_operand_maps_only_what_the_cpu_touched(name: str) -> None:
    c = run_model(PROGRAMS[name]).counters
    assert (c["pf_fixed"], c["pages_4k"]) == CMPS_CPL3[name]


def test_cmps_mmio_reads_come_source_first_at_both_rings() -> None:
    """Both operands on MMIO: at CPL3 the #PF is on RDI, but KVM's emulator then reads RSI first."""
    for ring in ("cpl0", "cpl3"):
        obs = run_model(PROGRAMS[f"cmps_mmio_mmio_{ring}"])
        assert [m.addr for m in obs.mmio] == [0xD000_0000, 0xD000_1000, 0xD000_0004, 0xD000_1004]


def test_a_native_cpl0_reads_rdi_first() -> None:
    """vmx-shadow runs CPL0 on the CPU: the CPU's order (the measured CPL3 order)."""
    obs = run_model(PROGRAMS["cmps_both_fault_cpl0"], "vmx-shadow")
    assert _cr2s(obs) == CMPS_CR2["cmps_both_fault_cpl3"]


# canonical_straddle: three accesses straddling 0x800000000000, then two whose first byte is
# non-canonical.  Real host, both rings: #PF with CR2 0x800000000000 (error code W/U as the access)
# and the bytes below the boundary written; then #GP(0) twice.
STRADDLE_FAULTS = {0: [(14, 2), (14, 2), (14, 0), (13, 0), (13, 0)], 3: [(14, 6), (14, 6), (14, 4), (13, 0), (13, 0)]}
# The last qword of the page after the run: the dword store wrote dd cc at ...ffe, then the qword
# store 88 77 66 55 44 at ...ffb..fff (little-endian 0x1122334455667788; the rest keeps 0x11).
STRADDLE_TAIL = "1111118877665544"
# With slot 256 mapped the upper page's first bytes: bb aa from the dword, then 33 22 11 (the
# qword's top three bytes) over them; the rest keeps 0x22.
SLOT256_HEAD = "3322112222222222"


@pytest.mark.parametrize("cpl", [0, 3])
def test_a_straddling_access_is_a_page_fault_after_the_low_bytes_in_kvm(cpl: int) -> None:
    obs = run_model(PROGRAMS[f"canonical_straddle_cpl{cpl}"])
    assert [(f.vector, f.error_code) for f in obs.faults] == STRADDLE_FAULTS[cpl]
    assert [f.cr2 for f in obs.faults[:3]] == [0x8000_0000_0000] * 3
    assert obs.memory[BACK][-8:].hex() == STRADDLE_TAIL


@pytest.mark.parametrize("cpl", [0, 3])
def test_a_straddling_access_is_gp_without_kvm_deviations(cpl: int) -> None:
    """SDM: #GP(0) when any byte is non-canonical; nothing is written."""
    obs = run_model(PROGRAMS[f"canonical_straddle_cpl{cpl}"], SDM_PROFILE)
    assert [(f.vector, f.error_code) for f in obs.faults] == [(13, 0)] * 5
    assert obs.memory[BACK][-8:] == b"\x11" * 8


def test_a_straddling_access_reaches_a_mapped_slot_256() -> None:
    """With the guest's PML4 slot 256 mapped KVM's emulator completes the access there (measured:
    no #PF, the upper page's first bytes written)."""
    obs = run_model(PROGRAMS["canonical_straddle_slot256_cpl0"])
    assert [f.vector for f in obs.faults] == [13, 13]
    assert obs.memory[BACK + 0x1000][:8].hex() == SLOT256_HEAD


@needs_pvm
@pytest.mark.realkvm
def test_the_real_host() -> None:
    """The figures above, measured again on this machine's /dev/kvm."""
    for name, cr2 in CMPS_CR2.items():
        assert _cr2s(run_real(PROGRAMS[name])) == cr2
    for name, want in CMPS_CPL3.items():
        c = run_real(PROGRAMS[name]).counters
        assert (c["pf_fixed"], c["pages_4k"]) == want
    for cpl in (0, 3):
        obs = run_real(PROGRAMS[f"canonical_straddle_cpl{cpl}"])
        assert [(f.vector, f.error_code) for f in obs.faults] == STRADDLE_FAULTS[cpl]
        assert obs.memory[BACK][-8:].hex() == STRADDLE_TAIL
    obs = run_real(PROGRAMS["canonical_straddle_slot256_cpl0"])
    assert obs.memory[BACK + 0x1000][:8].hex() == SLOT256_HEAD
