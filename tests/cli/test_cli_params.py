"""Report headers name KVM's module parameters (tdp_mmu, mmio_caching, ept/npt); --tdp-mmu selects the MMU."""

import json

import pytest

from kvmmu.cli import main
from tests.cli.test_cli import TINY


@pytest.fixture
def tiny_ept(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(TINY.replace('mmu = "shadow"', 'mmu = "ept"'))
    return str(p)


def _run(capsys, *argv):
    code = main(list(argv))
    out, _ = capsys.readouterr()
    assert code == 0
    return out


@pytest.mark.parametrize("flag,tdp", [((), "Y"), (("--tdp-mmu", "N"), "N")])
def test_run_header_and_json_name_the_parameters(capsys, tiny_ept, flag, tdp):
    out = _run(capsys, "run", tiny_ept, "-q", *flag)
    assert f"KVM module parameters: g: kvm.tdp_mmu={tdp} kvm.mmio_caching=Y kvm_intel.ept=Y" in out
    data = json.loads(_run(capsys, "run", tiny_ept, "-q", "--json", *flag))
    assert data["vms"][0]["kvm_params"] == {"kvm": {"tdp_mmu": tdp, "mmio_caching": "Y"}, "kvm_intel": {"ept": "Y"}}


def test_compare_header_names_each_columns_parameters(capsys, tiny_ept):
    out = _run(capsys, "compare", tiny_ept, "--mmus", "shadow,npt", "--policies", "off,generation", "-q")
    assert "  shadow/off: kvm.tdp_mmu=N kvm.mmio_caching=N kvm_intel.ept=N" in out
    assert "  npt/generation: kvm.tdp_mmu=Y kvm.mmio_caching=Y kvm_amd.npt=Y" in out


def test_flavours_header(capsys):
    out = _run(capsys, "flavours", "--iterations", "20", "--mmus", "npt", "--tdp-mmu", "N", "--policy", "off")
    assert "KVM module parameters: tdp_mmu=N" in out and "mmio_caching=N" in out
