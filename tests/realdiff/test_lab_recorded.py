"""The model against the real KVM 6.1 the lab recorded (tests/realdiff/lab/*.json, docs/real-kvm.md,
"the nested lab").  The sets of programs that do not agree are the measured ones documented there:
a regression or an improvement of the model changes them and fails here."""

from pathlib import Path

import pytest

from kvmmu.lab.compare import diff_recorded, load_recorded_programs
from kvmmu.lab.record import load_results

HERE = Path(__file__).parent
CORPUS = [HERE / "corpus", HERE / "lab" / "scenarios"]

# svm-shadow: 86 of 100 agree (docs/real-kvm.md lists the reasons).
SHADOW_DIFFER = {
    "cr0_wp_toggle_cpl3", "demand_paging_cpl0", "demand_paging_cpl3", "demand_read_first_cpl0",
    "demand_read_first_cpl3", "fetch_from_mmio_cpl3", "long_loop_cpl0", "long_loop_cpl3",
    "mmio_loop_16_cpl0", "mmio_unaligned_cpl3", "rep_movs_to_mmio_cpl0", "rep_movs_to_mmio_cpl3",
    "slot_readd_readonly_cpl3", "sse16_mmio_cpl3",
}


@pytest.fixture(scope="module")
def programs() -> list:
    # Every recording was made in the lab's L1 (guest MAXPHYADDR 40): the corpus as it loaded it there.
    return load_recorded_programs(CORPUS, load_results(HERE / "lab" / "npt-legacy.json"))


def _not_agreeing(programs: list, name: str) -> set[str]:
    results = load_results(HERE / "lab" / f"{name}.json")
    chosen = [p for p in programs if p.name in results["programs"]]
    assert len(chosen) == len(results["programs"])
    return {r.name for r in diff_recorded(chosen, results, results["profile"]) if r.status != "agree"}


def test_recorded_files_name_their_kernel_and_parameters() -> None:
    for name, tdp, npt, caching, gb in (("npt", "Y", "Y", "Y", False), ("npt-legacy", "N", "Y", "Y", False),
                                        ("shadow", "Y", "N", "Y", True), ("shadow-nommio", "Y", "N", "N", None)):
        r = load_results(HERE / "lab" / f"{name}.json")
        assert r["kernel"]["release"] == "6.1.0-57-amd64"
        p = r["parameters"]
        assert (p["kvm.tdp_mmu"], p["kvm_amd.npt"], p["kvm.mmio_caching"], p["kvm_amd.nrips"]) == (
            tdp, npt, caching, "0")
        assert r["guest_paging"]["maxphyaddr"] == 40
        if gb is not None:
            assert r["guest_paging"]["gbpages"] is gb


def test_shadow_agreement(programs: list) -> None:
    assert _not_agreeing(programs, "shadow") == SHADOW_DIFFER


# svm-npt-legacy: 94 of 100 agree (docs/real-kvm.md lists the reasons).
LEGACY_DIFFER = {
    # RF in the exception frame TCG pushes (0x202 real, 0x10202 model), as under svm-shadow.
    "cr0_wp_toggle_cpl3", "slot_readd_readonly_cpl3",
    # exits only: +1 on the real side (L1's timer, the minimum over the runs), -1 for fetch_from_mmio_cpl3
    # (with one insn_emulation less), as under svm-shadow.
    "demand_paging_cpl0", "mmio_loop_16_cpl0", "gen_wraparound", "fetch_from_mmio_cpl3",
}


def test_npt_legacy_agreement(programs: list) -> None:
    """L1's Linux 6.1 backs the VMM's memory with transparent huge pages on 4 KiB-aligned mappings, so
    the legacy MMU's direct prefetch finds whole huge pages present (pages_4k); see docs/real-kvm.md."""
    assert _not_agreeing(programs, "npt-legacy") == LEGACY_DIFFER


def test_npt_legacy_nommio_mmio64_agrees(programs: list) -> None:
    assert _not_agreeing(programs, "npt-legacy-nommio") == set()


def test_npt_tdp_agreement(programs: list) -> None:
    assert len(_not_agreeing(programs, "npt")) <= 8


@pytest.mark.parametrize("name", ["shadow-nommio", "npt-legacy-nommio"])
def test_mmio64_without_mmio_caching(name: str) -> None:
    """mmio_caching=0: every read is a full fault, no MMIO spte (measured)."""
    c = load_results(HERE / "lab" / f"{name}.json")["programs"]["mmio64"]["counters"]
    assert (c["mmio_exits"], c["pf_emulate"], c["pf_mmio_spte_created"]) == (64, 64, 0)


@pytest.mark.parametrize("name", ["npt", "npt-legacy", "shadow"])
def test_generation_scenarios_trace(name: str) -> None:
    """One MMIO spte, 63 RSVD fast-path exits; a new slot: check_mmio_spte valid 0, gen 2 -> 4."""
    progs = load_results(HERE / "lab" / f"{name}.json")["programs"]
    m = progs["mmio64"]
    assert m["trace"]["counts"]["mark_mmio_spte"] == 1 and m["trace"]["rsvd_faults"] == 63
    created = progs["gen_slot_created"]["trace"]["lines"]
    assert [line.split()[-1] for line in created["mark_mmio_spte"]] == ["2", "4"]
    assert created["check_mmio_spte"][0].endswith("kvm_gen 4 spte-gen 2 valid 0")
    for scenario in ("gen_slot_deleted", "gen_wraparound"):
        assert progs[scenario]["trace"]["counts"]["kvm_mmu_zap_all_fast"] == 1
