"""The lab's KVM configurations: module parameters for L1 and the model's matching host profile."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument


@dataclass(frozen=True)
class LabConfig:
    name: str
    kvm: dict[str, str]        # kvm.ko parameters
    kvm_amd: dict[str, str]    # kvm-amd.ko parameters
    profile: str               # kvmmu.kvm.profiles name, with MMIO caching on
    summary: str

    def params(self, mmio_caching: bool) -> tuple[dict[str, str], dict[str, str]]:
        return {"mmio_caching": "1" if mmio_caching else "0", **self.kvm}, dict(self.kvm_amd)

    def profile_name(self, mmio_caching: bool) -> str:
        return self.profile if mmio_caching else f"{self.profile}-nommio"

    def label(self, mmio_caching: bool) -> str:
        return self.name if mmio_caching else f"{self.name}-nommio"


CONFIGS: dict[str, LabConfig] = {
    "npt": LabConfig("npt", {"tdp_mmu": "1"}, {"npt": "1"}, "svm-npt-tdp",
                     "nested paging, the TDP MMU (tdp_mmu=1, KVM's default)"),
    "npt-legacy": LabConfig("npt-legacy", {"tdp_mmu": "0"}, {"npt": "1"}, "svm-npt-legacy",
                            "nested paging on the legacy (shadow-page) MMU, tdp_mmu=0"),
    "shadow": LabConfig("shadow", {"tdp_mmu": "1"}, {"npt": "0"}, "svm-shadow",
                        "shadow paging, npt=0 (tdp_mmu has no effect without TDP)"),
}

# What the parameters must read back as from /sys/module (Y/N for bools, as KVM prints them).
def expected_readback(config: LabConfig, mmio_caching: bool) -> dict[str, str]:
    kvm, amd = config.params(mmio_caching)
    yn = {"0": "N", "1": "Y"}
    return {**{f"kvm.{k}": yn[v] for k, v in kvm.items()}, **{f"kvm_amd.{k}": yn[v] for k, v in amd.items()}}


def get_config(name: str) -> LabConfig:
    if name not in CONFIGS:
        raise InvalidArgument("config", name, f"lab configurations are {sorted(CONFIGS)}")
    return CONFIGS[name]


__all__ = ["CONFIGS", "LabConfig", "expected_readback", "get_config"]
