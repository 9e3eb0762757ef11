"""A huge spte needs a huge host page behind it (host_pfn_mapping_level reads the host's page tables).

Under a host memory limit the model tracks residency per 4 KiB page, and Linux splits a transparent
huge page to swap part of it out (nothing here re-forms it: khugepaged is not modelled).  Found by the
fuzzer when the TDP MMU landed: a 2 MiB spte over a frame with a swapped-out page, which the MMU
notifier had no spte to zap for when the page left.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.bits import X86_CR0_PE

SLOT_GPA = 1 << 30
MiB = 1 << 20


def _vm(tdp_mmu: bool) -> tuple[kvmmu.VM, kvmmu.Vcpu]:
    vm = kvmmu.VM(mmu="ept", tdp_mmu=tdp_mmu, host_hugepage_level=2, host=kvmmu.Host(memory_limit=256 * MiB))
    vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT_GPA, memory_size=2 * MiB)
    v = vm.create_vcpu()
    v.set_sregs(cr0=X86_CR0_PE, cr3=0, cr4=0, efer=0)          # paging off: gva = gpa
    return vm, v


def _frame_pfns(vm: kvmmu.VM) -> list[int]:
    hva = vm.memslots.slot(1, 0).gfn_to_hva(SLOT_GPA >> 12)
    return [(hva >> 12) + i for i in range(512)]


@pytest.mark.parametrize("tdp_mmu", [True, False], ids=["tdp_mmu", "legacy"])
def test_a_frame_that_lost_a_page_to_swap_is_mapped_4k(tdp_mmu: bool) -> None:
    vm, v = _vm(tdp_mmu)
    pfns = _frame_pfns(vm)
    for p in pfns:                       # the whole huge page is resident
        vm.host.touch(p)
    v.access(SLOT_GPA + 0x5000, 4, "write", 1)
    assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (1, 0)
    vm.host.swap_out_pages([pfns[7]])    # the MMU notifier drops the 2 MiB spte first
    assert vm.stats["pages_2m"] == 0
    vm.audit()
    v.access(SLOT_GPA + 0x5000, 4, "read")
    assert vm.stats["pages_2m"] == 0 and vm.stats["pages_4k"] >= 1
    assert v.access(SLOT_GPA + 0x7000, 4, "read").fault is None   # swapped back in by the fault
    vm.audit()


@pytest.mark.parametrize("tdp_mmu", [True, False], ids=["tdp_mmu", "legacy"])
def test_no_huge_spte_covers_a_page_the_host_does_not_hold(tdp_mmu: bool) -> None:
    vm, v = _vm(tdp_mmu)
    v.access(SLOT_GPA + 0x21000, 4, "write", 1)    # only this page of the frame is resident
    assert vm.stats["pages_2m"] == 0
    vm.audit()
