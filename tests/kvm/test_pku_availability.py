"""Whether a vCPU has protection keys: VM(pku=...), its default per flavour, and the host profiles.

Expected behaviour comes from KVM's source and from a measurement on the real /dev/kvm:

- arch/x86/kvm/cpuid.c, kvm_set_cpu_caps: X86_FEATURE_PKU is cleared when TDP is off (shadow
  paging), so KVM never offers PKU with shadow paging;
- arch/x86/kvm/x86.h, __cr4_reserved_bits: without PKU, CR4.PKE is a reserved CR4 bit, so
  kvm_is_valid_cr4 fails: KVM_SET_SREGS returns -EINVAL (nothing is applied, __set_sregs checks
  first) and a guest MOV to CR4 gets #GP (kvm_set_cr4 returns 1);
- arch/x86/kvm/mmu/mmu.c, update_pkru_bitmask: pkru_mask stays 0 without CR4.PKE, so PKRU's value
  never reaches permission_fault: whatever PKRU holds, no key denies anything;
- docs/real-kvm.md: the kvm_pvm host here accepts CR4.PKE in KVM_SET_SREGS although it reports no
  PKU (measured again by the realkvm test below), so the kvm-pvm profile keeps PKU.

By default (kvm_deviations=False) the model's shadow-paging vCPUs have PKU and honour the guest
leaf's key (tests/fullstack/test_pkeys.py).
"""

from __future__ import annotations

import os

import pytest

import kvmmu
from kvmmu.arch.bits import X86_CR4_PAE, X86_CR4_PKE
from kvmmu.guest.pagetables import RW, US, D, P
from kvmmu.hw.x86cpu import CpuFault
from kvmmu.kvm.profiles import PROFILES
from tests.badinput.snapshot import LONG_MODE, assert_refused, assert_unchanged, running_vm, vm_state

PKE_CR4 = X86_CR4_PAE | X86_CR4_PKE


@pytest.mark.parametrize("mmu", ["shadow", "ept", "npt"])
@pytest.mark.parametrize("deviations", [False, True])
def test_cr4_pke_is_refused_only_under_shadow_paging_with_kvm_deviations(mmu: str, deviations: bool) -> None:
    vm, vcpu, _ = running_vm(mmu, kvm_deviations=deviations)
    hidden = mmu == "shadow" and deviations
    assert vm.pku is not hidden
    if hidden:
        assert_refused(vm, lambda: vcpu.set_sregs(cr4=PKE_CR4, pkru=0x4), "cr4", PKE_CR4, "KVM_SET_SREGS",
                       match="CR4.PKE is reserved")
        exits = vcpu.stats["exits"]
        assert_refused(vm, lambda: vcpu.write_cr4(PKE_CR4), "cr4", PKE_CR4, "MOV to CR4 (#GP)")
        assert vcpu.stats["exits"] == exits, "the #GP is raised before anything, the exit included"
    else:
        vcpu.set_sregs(cr4=PKE_CR4)
        assert vcpu.cr4 == PKE_CR4
        vcpu.write_cr4(X86_CR4_PAE)
        vcpu.write_cr4(PKE_CR4)
        assert vcpu.cr4 == PKE_CR4


def test_without_pku_pkru_is_kept_but_never_denies() -> None:
    """update_pkru_bitmask: no CR4.PKE, no key check, whatever PKRU says (here: every key but 0
    access-disabled, and the page has key 1)."""
    vm, vcpu, pt = running_vm("shadow", kvm_deviations=True)
    pt.map(0x70_0000, 0x30_0000, flags=P | RW | US | D, pkey=1)
    vcpu.set_sregs(pkru=0xFFFF_FFFC, **LONG_MODE)
    assert vcpu.pkru == 0xFFFF_FFFC
    assert vcpu.access(0x70_0000, 4, "write", 1, cpl=3).fault is None
    assert vcpu.access(0x70_0000, 4, "read", cpl=3).value == 1
    vm.audit()


def test_pku_can_be_chosen_explicitly() -> None:
    vm, vcpu, _ = running_vm("ept", pku=False)
    assert_refused(vm, lambda: vcpu.set_sregs(cr4=PKE_CR4), "cr4", PKE_CR4, "KVM_SET_SREGS")
    vm, vcpu, _ = running_vm("shadow", kvm_deviations=True, pku=True)
    vcpu.set_sregs(cr4=PKE_CR4)
    assert vcpu.cr4 == PKE_CR4


def test_a_bad_pku_value_is_refused() -> None:
    with pytest.raises(kvmmu.InvalidArgument, match="pku") as info:
        kvmmu.VM(pku="yes")  # type: ignore[arg-type]
    assert "'yes'" in str(info.value)


@pytest.mark.parametrize("name, accepted", [("vmx-shadow", False), ("vmx-ept", True), ("kvm-pvm", True)])
def test_host_profiles(name: str, accepted: bool) -> None:
    """vmx-shadow is upstream KVM with ept=0 (PKU hidden); kvm-pvm is the measured host."""
    vm = PROFILES[name].make_vm()
    assert vm.pku is accepted
    vm.set_user_memory_region(0, 0, 1 << 20)
    vcpu = vm.create_vcpu()
    if accepted:
        vcpu.set_sregs(cr4=PKE_CR4)
        return
    before = vm_state(vm, guest_memory=False)
    with pytest.raises(kvmmu.InvalidArgument, match="CR4.PKE"):
        vcpu.set_sregs(cr4=PKE_CR4)
    assert_unchanged(before, vm_state(vm, guest_memory=False), "KVM_SET_SREGS")
    # The guest's MOV to CR4, through the profile's bus: KVM refuses it, the guest sees #GP.
    bus = PROFILES[name].make_bus(vcpu)
    with pytest.raises(CpuFault) as info:
        bus.write_cr(None, 4, PKE_CR4)  # type: ignore[arg-type]
    assert info.value.vector == 13 and info.value.error_code == 0
    assert vcpu.cr4 == 0


@pytest.mark.realkvm
@pytest.mark.skipif(not os.path.exists("/dev/kvm") or not os.path.exists("/sys/module/kvm_pvm"),
                    reason="measured on a kvm_pvm host")
def test_the_kvm_pvm_host_accepts_cr4_pke() -> None:
    """The measurement behind the kvm-pvm profile's pku=True."""
    from kvmmu.real import FlatLongMode, RealVM
    vm = RealVM()
    try:
        vm.set_user_memory_region(0, 0, 2 << 20)
        vcpu = vm.create_vcpu()
        FlatLongMode().install(vm, vcpu, cpl=0)
        cr4 = vcpu.get_sregs().cr4
        vcpu.set_sregs(cr4=cr4 | X86_CR4_PKE)
        assert vcpu.get_sregs().cr4 & X86_CR4_PKE
    finally:
        vm.close()
