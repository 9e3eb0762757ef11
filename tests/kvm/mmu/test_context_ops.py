"""struct kvm_mmu's ops as KVM assigns them where a context is built (mmu.c, vmx/nested.c).

The expected pairs are KVM's: init_kvm_tdp_mmu sets page_fault = kvm_tdp_page_fault and no
sync_spte, whatever the guest's mode, and gva_to_gpa by the guest's paging (nonpaging_gva_to_gpa
with paging off); init_kvm_softmmu's nonpaging context has nonpaging_page_fault and no sync_spte, its
paging contexts FNAME(page_fault) and FNAME(sync_spte); nested_ept_init_mmu_context makes guest_mmu
an EPT shadow rooted at the EPTP whose failed walks are nested_ept_inject_page_fault; while L2 runs,
walk_mmu is nested_mmu, and it is root_mmu again after the nested VM exit.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import EFER_LME, X86_CR0_PE, X86_CR0_PG, X86_CR4_PAE
from kvmmu.guest.pagetables import GuestPageTables, vm_writer
from kvmmu.kvm.mmu import direct, paging
from kvmmu.kvm.mmu.context import get_guest_cr3, kvm_inject_page_fault
from kvmmu.kvm.mmu.nested_ept import NestedMmu, ShadowEptMmu, nested_ept_get_eptp, nested_gva_to_gpa
from kvmmu.kvm.nested import nested_ept_inject_page_fault

LONG_MODE = {"cr0": X86_CR0_PG | X86_CR0_PE, "cr3": 0x1000, "cr4": X86_CR4_PAE, "efer": EFER_LME}
NONPAGING = {"cr0": X86_CR0_PE, "cr3": 0, "cr4": 0, "efer": 0}


def _vcpu(mmu: str, regs: dict[str, int]) -> kvmmu.Vcpu:
    vm = kvmmu.VM(mmu=mmu)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(**regs)
    return vcpu


@pytest.mark.parametrize("flavour", ["ept", "npt"])
@pytest.mark.parametrize(("regs", "gva_to_gpa"), [(LONG_MODE, paging.paging_gva_to_gpa),
                                                  (NONPAGING, direct.nonpaging_gva_to_gpa)])
def test_tdp_context_faults_on_gpas_and_walks_by_guest_mode(flavour: str, regs: dict[str, int],
                                                            gva_to_gpa: object) -> None:
    mmu = _vcpu(flavour, regs).mmu
    assert mmu.page_fault is direct.kvm_tdp_page_fault
    assert mmu.sync_spte is None
    assert mmu.gva_to_gpa is gva_to_gpa


def test_shadow_context_with_guest_paging_shadows_the_guest_tables() -> None:
    vcpu = _vcpu("shadow", LONG_MODE)
    mmu = vcpu.mmu
    assert (mmu.page_fault, mmu.sync_spte, mmu.gva_to_gpa) == \
        (paging.page_fault, paging.sync_spte, paging.paging_gva_to_gpa)
    assert mmu.inject_page_fault is kvm_inject_page_fault
    assert mmu.get_guest_pgd is get_guest_cr3 and mmu.get_guest_pgd(mmu) == 0x1000


def test_shadow_context_without_guest_paging_is_direct() -> None:
    mmu = _vcpu("shadow", NONPAGING).mmu
    assert (mmu.page_fault, mmu.sync_spte, mmu.gva_to_gpa) == \
        (direct.nonpaging_page_fault, None, direct.nonpaging_gva_to_gpa)


def test_context_ops_follow_a_mode_change() -> None:
    """kvm_mmu_reset_context rebuilds the context: enabling guest paging replaces the direct ops."""
    vcpu = _vcpu("shadow", NONPAGING)
    vcpu.set_sregs(**LONG_MODE)
    assert vcpu.mmu.page_fault is paging.page_fault and vcpu.mmu.sync_spte is paging.sync_spte


def test_nested_entry_switches_to_guest_mmu_and_nested_mmu_and_exit_back() -> None:
    vcpu = _vcpu("ept", LONG_MODE)
    root_mmu = vcpu.mmu
    w, r = vm_writer(vcpu.vm)
    ept = GuestPageTables("ept4", w, r, pool=0x100000)
    ept.map(0, 0x800000, 2 << 20)
    eptp = ept.eptp()
    vcpu.enter_guest_mode(eptp, cr0=X86_CR0_PE, cr3=0, cr4=0, efer=0)
    guest_mmu = vcpu.mmu
    assert isinstance(guest_mmu, ShadowEptMmu) and vcpu.guest_mmu is guest_mmu
    assert (guest_mmu.page_fault, guest_mmu.sync_spte) == (paging.page_fault, paging.sync_spte)
    assert guest_mmu.inject_page_fault is nested_ept_inject_page_fault
    assert guest_mmu.get_guest_pgd is nested_ept_get_eptp and guest_mmu.get_guest_pgd(guest_mmu) == eptp
    assert isinstance(vcpu.walk_mmu, NestedMmu) and vcpu.walk_mmu.gva_to_gpa is nested_gva_to_gpa
    vcpu.leave_guest_mode()
    assert vcpu.mmu is root_mmu and vcpu.walk_mmu is root_mmu
