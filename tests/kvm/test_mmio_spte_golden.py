"""The MMIO sptes KVM installs in real scenarios, compared bit-for-bit with the worked examples of
§2.5.2 (gfn 0xfee00, access 6, generation 0x12345, host MAXPHYADDR 46, no L1TF).

Generation 0x12345 is odd, so the VM has one address space (generations advance by 1); it starts at
0x12344 and creating slot 0 brings it to 0x12345.  gfn 0xfee00 is the default APIC page; this model
has no internal APIC-access slot, so for KVM's MMU it is simply a gfn without a memslot.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import X86_CR0_PE
from kvmmu.guest.pagetables import D, GuestPageTables, vm_writer
from tests.kvm.harness import LONG_MODE, RWU, WARM, MiB

APIC_GPA = 0xFEE0_0000
NON_EPT_GOLDEN = 0x12380000FEE0022F
EPT_GOLDEN = 0x12300000FEE0022E


def _vm(mmu: str) -> kvmmu.VM:
    vm = kvmmu.VM(mmu=mmu, mmio_caching="generation", address_spaces=1, initial_generation=0x12344)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=32 * MiB)
    assert vm.memslots.generation(0) == 0x12345
    return vm


def test_shadow_paging_mmio_spte_matches_worked_example() -> None:
    """§2.5.2: shadow paging, gfn 0xfee00, access 6 (dirty RW user gpte), gen 0x12345 ->
    0x12380000fee0022f (bit 51 + P, W/U, gen low 0x45 in bits 3-10, gen high 0x123 in bits 52-62)."""
    vm = _vm("shadow")
    w, r = vm_writer(vm)
    pt = GuestPageTables("4level", w, r, pool=0x10_0000, pool_end=0x20_0000)
    pt.map(WARM, WARM)
    pt.map(0x4000_0000, APIC_GPA, flags=RWU | D)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert len(vcpu.access(0x4000_0000, 4, "read").mmio_exit_records) == 1
    level, spte = list(vcpu.mmu.shadow_walk(0x4000_0000))[-1]
    assert (level, spte) == (1, NON_EPT_GOLDEN)
    vm.audit()


@pytest.mark.parametrize("mmu,golden", [("ept", EPT_GOLDEN), ("npt", NON_EPT_GOLDEN)])
def test_tdp_mmio_spte_matches_worked_example(mmu: str, golden: int) -> None:
    """§2.5.2 / §3.9: TDP installs make_mmio_spte(gfn, ACC_ALL): on EPT the access is masked to 0 ->
    0x12300000fee0022e; NPT uses the non-EPT layout with access ACC_ALL & (W|U) = 6 -> 0x12380000fee0022f."""
    vm = _vm(mmu)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PE)
    assert len(vcpu.access(APIC_GPA, 4, "read").mmio_exit_records) == 1
    level, spte = list(vcpu.mmu.shadow_walk(APIC_GPA))[-1]
    assert (level, spte) == (1, golden)
    vm.audit()
