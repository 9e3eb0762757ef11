"""KVM's module parameters as a host configuration: `kvmmu.KvmParams(...)`, passed as `VM(params=...)`.

    kvm.ko        tdp_mmu (Y), mmio_caching (Y)
    kvm-intel.ko  ept (Y)          kvm-amd.ko  npt (Y)

`vendor` says which of kvm-intel / kvm-amd is loaded.  The parameters map onto the VM's own
arguments: ept/npt choose `mmu="ept"|"npt"` or shadow paging, `mmio_caching=Y` is today's design
(`mmio_caching="generation"`; the 2011 design "zap" is a model-only choice with caching on), and
`tdp_mmu` chooses the TDP MMU or the legacy MMU for EPT/NPT.

`vm.params` reads them back as /sys/module/*/parameters would show them for that VM: KVM itself
turns `mmio_caching` off when the host leaves no reserved bit for MMIO sptes
(kvm_mmu_set_mmio_spte_mask: with MAXPHYADDR 52 shadow paging and NPT have no reserved PA bit),
and `tdp_mmu` is what the VM uses (N without EPT/NPT, as Linux 6.3+ reports it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument

VENDORS = ("intel", "amd")


@dataclass(frozen=True)
class KvmParams:
    """The module parameters that shape KVM's MMU."""

    tdp_mmu: bool = True
    mmio_caching: bool = True
    ept: bool = True
    npt: bool = True
    vendor: str = "intel"

    def __post_init__(self) -> None:
        for name in ("tdp_mmu", "mmio_caching", "ept", "npt"):
            value = getattr(self, name)
            if type(value) is not bool:
                raise InvalidArgument(name, value, f"the module parameter {name} is True or False")
        if self.vendor not in VENDORS:
            raise InvalidArgument("vendor", self.vendor, f"the vendor module is one of {VENDORS} (kvm-intel, kvm-amd)")

    @property
    def mmu(self) -> str:
        """VM(mmu=...) for these parameters."""
        if self.vendor == "intel":
            return "ept" if self.ept else "shadow"
        return "npt" if self.npt else "shadow"

    @property
    def mmio_policy(self) -> str:
        return "generation" if self.mmio_caching else "off"

    def sysfs(self) -> dict[str, dict[str, str]]:
        """The parameters as /sys/module/<module>/parameters/<name> reads them (Y / N)."""
        yn = {True: "Y", False: "N"}
        vendor = {"kvm_intel": {"ept": yn[self.ept]}} if self.vendor == "intel" else {"kvm_amd": {"npt": yn[self.npt]}}
        return {"kvm": {"tdp_mmu": yn[self.tdp_mmu], "mmio_caching": yn[self.mmio_caching]}, **vendor}

    def header(self) -> str:
        """One line for report headers."""
        vendor = f"ept={'Y' if self.ept else 'N'}" if self.vendor == "intel" else f"npt={'Y' if self.npt else 'N'}"
        return (f"kvm.tdp_mmu={'Y' if self.tdp_mmu else 'N'} kvm.mmio_caching={'Y' if self.mmio_caching else 'N'} "
                f"kvm_{self.vendor}.{vendor}")


class _Default(str):
    """A default argument value that can be told apart from the same value passed explicitly."""


DEFAULT_MMU = _Default("shadow")
DEFAULT_MMIO_CACHING = _Default("generation")


def resolve(mmu: str, mmio_caching: str, tdp_mmu: bool | None,
            params: KvmParams | None) -> tuple[str, str, bool]:
    """(mmu, mmio_caching, tdp_mmu) from the VM's arguments and, if given, the module parameters;
    an argument that contradicts a parameter is refused."""
    if tdp_mmu is not None and type(tdp_mmu) is not bool:
        raise InvalidArgument("tdp_mmu", tdp_mmu, "tdp_mmu is True (the TDP MMU) or False (the legacy MMU)")
    if params is None:
        return str(mmu) if mmu is DEFAULT_MMU else mmu, \
            str(mmio_caching) if mmio_caching is DEFAULT_MMIO_CACHING else mmio_caching, \
            True if tdp_mmu is None else tdp_mmu
    asked_mmu = None if mmu is DEFAULT_MMU else mmu
    asked_mmio = None if mmio_caching is DEFAULT_MMIO_CACHING else mmio_caching
    if not isinstance(params, KvmParams):
        raise InvalidArgument("params", params, "params is a kvmmu.KvmParams (or None)")
    if asked_mmu is not None and asked_mmu != params.mmu:
        raise InvalidArgument("mmu", asked_mmu,
                              f"contradicts the module parameters ({params.header()} means {params.mmu!r})")
    if asked_mmio is not None and (asked_mmio == "off") == params.mmio_caching:
        raise InvalidArgument("mmio_caching", asked_mmio,
                              f"contradicts kvm.mmio_caching={'Y' if params.mmio_caching else 'N'}")
    if tdp_mmu is not None and tdp_mmu != params.tdp_mmu:
        raise InvalidArgument("tdp_mmu", tdp_mmu, f"contradicts kvm.tdp_mmu={'Y' if params.tdp_mmu else 'N'}")
    return params.mmu, asked_mmio if asked_mmio is not None else params.mmio_policy, params.tdp_mmu
