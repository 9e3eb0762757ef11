"""Boots the lab (`make lab` runs these: `pytest -m lab`); skipped when it is not set up."""

from pathlib import Path

import pytest

from kvmmu.lab.configs import get_config
from kvmmu.lab.kmod import KVM_MODULES, SHARE_MODULES, ModuleTree
from kvmmu.lab.setup import LabKernel, ready

pytestmark = [pytest.mark.lab, pytest.mark.skipif(ready() is not None, reason=f"lab: {ready()}")]
SCENARIOS = Path(__file__).parents[1] / "realdiff" / "lab" / "scenarios"


def test_kernel_tree_has_what_l1_needs() -> None:
    lab = LabKernel.load()
    assert lab is not None
    tree = ModuleTree(Path(lab.modules_dir))
    order = tree.load_order([*SHARE_MODULES, *KVM_MODULES])
    assert order.index("kvm") < order.index("kvm_amd") and order.index("9pnet") < order.index("9p")


def test_mmio64_on_the_tdp_mmu() -> None:
    """One MMIO spte, 63 RSVD fast-path exits answered before handle_mmio_page_fault (docs/real-kvm.md)."""
    from kvmmu.lab.run import capture
    results, _ = capture(get_config("npt"), True, [str(SCENARIOS)], ["mmio64"], repeats=1)
    assert results["parameters"]["kvm.tdp_mmu"] == "Y" and results["parameters"]["kvm.mmio_caching"] == "Y"
    p = results["programs"]["mmio64"]
    assert p["counters"]["mmio_exits"] == 64 and p["counters"]["pf_mmio_spte_created"] == 1
    assert p["trace"]["counts"].get("mark_mmio_spte") == 1 and p["trace"]["rsvd_faults"] == 63
    assert "handle_mmio_page_fault" not in p["trace"]["counts"]
