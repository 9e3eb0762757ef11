"""What kind of /dev/kvm this machine has: the vendor module and the kvm parameters that change
guest-visible behaviour.  Read at run time, so that a comparison measured on one flavour is never
applied to another (a kvm_pvm host with ``mmio_caching=Y`` creates MMIO sptes; a VMX host runs CPL0
natively)."""

from __future__ import annotations

from pathlib import Path

SYS_MODULE = Path("/sys/module")
# the vendor modules that provide /dev/kvm, in the order they are looked for
VENDOR_MODULES = ("kvm_pvm", "kvm_intel", "kvm_amd")


def kvm_vendor(sys_module: Path = SYS_MODULE) -> str | None:
    """The loaded vendor module ("kvm_pvm", "kvm_intel", "kvm_amd"), or None."""
    for name in VENDOR_MODULES:
        if (sys_module / name).exists():
            return name
    return None


def kvm_param(name: str, sys_module: Path = SYS_MODULE) -> str | None:
    """A kvm.ko parameter as sysfs shows it ("Y"/"N"/number), or None when it is not there."""
    try:
        return (sys_module / "kvm" / "parameters" / name).read_text().strip()
    except OSError:
        return None


def kvm_pvm_mismatch(sys_module: Path = SYS_MODULE) -> str | None:
    """None when /dev/kvm is the flavour the ``kvm-pvm`` profile and the corpus expectations were
    measured on (kvm_pvm, shadow MMU without the TDP MMU, ``mmio_caching=N``); else why not."""
    vendor = kvm_vendor(sys_module)
    if vendor != "kvm_pvm":
        return f"the expectations are measured on kvm_pvm; this host's /dev/kvm is {vendor or 'absent'}"
    caching = kvm_param("mmio_caching", sys_module)
    if caching not in (None, "N", "0"):
        return f"the expectations are measured with kvm.mmio_caching=N; this host has {caching}"
    return None


__all__ = ["kvm_param", "kvm_pvm_mismatch", "kvm_vendor"]
