"""Building things with bad parameters: VM, Host, guest page tables, in-kernel devices, dirty logs.

Each is a kvmmu.InvalidArgument (a KvmmuError) that names the parameter, the value and the rule;
never a TypeError / AttributeError from deep inside, never silently accepted.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.guest.pagetables import GuestPageTables, vm_writer
from tests.badinput.snapshot import assert_names, assert_refused, running_vm

# (id, VM keyword arguments, parameter named, value)
BAD_VMS = [
    ("mmu", dict(mmu="vmx"), "mmu", "vmx"),
    ("mmu-none", dict(mmu=None), "mmu", None),
    ("policy", dict(mmio_caching="on"), "mmio_caching", "on"),
    ("address-spaces", dict(address_spaces=3), "address_spaces", 3),
    ("generation-negative", dict(initial_generation=-2), "initial_generation", -2),
    ("generation-odd", dict(initial_generation=(1 << 19) - 7), "initial_generation", (1 << 19) - 7),
    ("generation-huge", dict(initial_generation=1 << 62), "initial_generation", 1 << 62),
    ("generation-str", dict(initial_generation="0"), "initial_generation", "0"),
    ("maxphyaddr-small", dict(guest_maxphyaddr=31), "guest_maxphyaddr", 31),
    ("maxphyaddr-big", dict(guest_maxphyaddr=53), "guest_maxphyaddr", 53),
    ("maxphyaddr-str", dict(guest_maxphyaddr="46"), "guest_maxphyaddr", "46"),
    ("tdp-level", dict(mmu="ept", tdp_level=3), "tdp_level", 3),
    ("hugepage-level", dict(host_hugepage_level=0), "host_hugepage_level", 0),
    ("quota-negative", dict(max_mmu_pages=-1), "max_mmu_pages", -1),
    ("quota-zero", dict(max_mmu_pages=0), "max_mmu_pages", 0),
    ("quota-str", dict(max_mmu_pages="64"), "max_mmu_pages", "64"),
    ("host-not-a-host", dict(host="host"), "host", "host"),
]


@pytest.mark.parametrize("case", BAD_VMS, ids=[c[0] for c in BAD_VMS])
def test_bad_vm_parameter(case: tuple) -> None:
    """VM() refuses every parameter outside its documented range (KVM_SET_NR_MMU_PAGES refuses a
    quota below KVM_MIN_ALLOC_MMU_PAGES, 64)."""
    _id, kw, what, value = case
    with pytest.raises(kvmmu.InvalidArgument) as info:
        kvmmu.VM(**kw)
    assert_names(info.value, what, value)


@pytest.mark.parametrize("kw,what,value", [
    (dict(maxphyaddr=35), "host maxphyaddr", 35),
    (dict(maxphyaddr=53), "host maxphyaddr", 53),
    (dict(memory_limit=-1), "host memory_limit", -1),
])
def test_bad_host_parameter(kw: dict, what: str, value: int) -> None:
    with pytest.raises(kvmmu.InvalidArgument) as info:
        kvmmu.Host(**kw)
    assert_names(info.value, what, value)


def test_bad_guest_page_table_requests() -> None:
    """The page-table builder refuses unknown modes, page sizes the mode lacks and misaligned pages."""
    vm = kvmmu.VM()
    vm.set_user_memory_region(0, 0, 4 << 20)
    with pytest.raises(kvmmu.InvalidArgument) as info:
        GuestPageTables("6level", *vm_writer(vm), pool=0x10_0000)
    assert_names(info.value, "mode", "6level")
    pt = GuestPageTables("4level", *vm_writer(vm), pool=0x10_0000)
    with pytest.raises(kvmmu.InvalidArgument) as info:
        pt.map(0x40_0000, 0x40_0000, page_size=8192)
    assert_names(info.value, "page_size", 8192)
    with pytest.raises(kvmmu.InvalidArgument) as info:
        pt.map(0x40_0000, 0x40_1000, page_size=2 << 20)
    assert_names(info.value, "gpa", 0x40_1000)
    with pytest.raises(kvmmu.InvalidArgument):
        GuestPageTables("32bit", *vm_writer(vm), pool=0x10_0000).map(0x40_0000, 0x20_0000, page_size=2 << 20)


# (id, call on (vm), parameter named, value)
BAD_VMM_CALLS = [
    ("dirty-log-missing-slot", lambda vm: vm.get_dirty_log(9), "slot", 9),
    ("dirty-log-not-logging", lambda vm: vm.get_dirty_log(0), "slot", 0),
    ("dirty-log-str", lambda vm: vm.get_dirty_log("0"), "slot", "0"),
    ("io-device-negative", lambda vm: vm.register_io_device(-1, 4, object()), "io device range", -1),
    ("io-device-beyond-u64", lambda vm: vm.register_io_device((1 << 64) - 2, 4, object()), "io device range",
     (1 << 64) - 2),
    ("io-device-str", lambda vm: vm.register_io_device("0xfee00000", 4, object()), "io device range",
     "0xfee00000"),
    ("coalesced-negative-size", lambda vm: vm.register_coalesced_mmio(0xD000_0000, -1), "io device range", -1),
    ("coalesced-str", lambda vm: vm.register_coalesced_mmio("0xd0000000", 8), "io device range", "0xd0000000"),
]


@pytest.mark.parametrize("case", BAD_VMM_CALLS, ids=[c[0] for c in BAD_VMM_CALLS])
def test_bad_vmm_call_is_refused_and_changes_nothing(case: tuple) -> None:
    _id, call, what, value = case
    vm, _vcpu, _pt = running_vm("shadow")
    assert_refused(vm, lambda: call(vm), what, value, _id)
