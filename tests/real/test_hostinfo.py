"""The /dev/kvm flavour is read at run time: expectations measured on kvm_pvm with
kvm.mmio_caching=N are applied only to such a host (a fake /sys/module tree stands for others)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmmu.real.hostinfo import kvm_param, kvm_pvm_mismatch, kvm_vendor


def _sys(tmp_path: Path, vendor: str | None, **params: str) -> Path:
    root = tmp_path / "module"
    (root / "kvm" / "parameters").mkdir(parents=True)
    if vendor:
        (root / vendor).mkdir()
    for name, value in params.items():
        (root / "kvm" / "parameters" / name).write_text(value + "\n")
    return root


def test_kvm_pvm_with_mmio_caching_off_matches(tmp_path: Path) -> None:
    root = _sys(tmp_path, "kvm_pvm", mmio_caching="N", tdp_mmu="N")
    assert kvm_vendor(root) == "kvm_pvm" and kvm_param("tdp_mmu", root) == "N"
    assert kvm_pvm_mismatch(root) is None


@pytest.mark.parametrize(("vendor", "caching", "says"), [
    ("kvm_pvm", "Y", "mmio_caching=N; this host has Y"),
    ("kvm_intel", "Y", "is kvm_intel"),
    ("kvm_amd", "N", "is kvm_amd"),
    (None, "N", "is absent"),
])
def test_other_flavours_do_not_match(tmp_path: Path, vendor: str | None, caching: str, says: str) -> None:
    reason = kvm_pvm_mismatch(_sys(tmp_path, vendor, mmio_caching=caching))
    assert reason is not None and says in reason
