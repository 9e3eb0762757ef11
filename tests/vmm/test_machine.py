"""The default PC-like machine, in-kernel vs userspace devices, and host memory pressure."""

import pytest

import kvmmu
from kvmmu.guest.os import DIRECT_MAP, GuestOS, OsParams
from kvmmu.vmm import Machine, MachineSpec
from kvmmu.vmm.machine import FOUR_GIB, LAPIC_GPA, SERIAL_GPA

MiB = 1 << 20


def test_ram_sits_below_and_above_the_pci_hole():
    """RAM below the hole ends at min(RAM, pci_hole_start); the rest is mapped from 4 GiB up."""
    m = Machine(MachineSpec(ram_mib=4096, pci_hole_start=0xC0000000, framebuffer_mib=0), kvmmu.Host())
    ram = {r.name: (r.start, r.end) for r in m.layout() if r.kind == "ram"}
    assert ram["ram-below-4g"] == (0x100000, 0xC0000000)
    assert ram["ram-above-4g"] == (FOUR_GIB, FOUR_GIB + (4096 * MiB - 0xC0000000))
    assert m.ram_ranges() == [(0x100000, 0xC0000000), (FOUR_GIB, FOUR_GIB + 1024 * MiB)]


def test_small_guest_has_no_ram_above_4g():
    m = Machine(MachineSpec(ram_mib=512), kvmmu.Host())
    assert [r for r in m.layout() if r.name == "ram-above-4g"] == []
    assert m.vm.memslots.slot(2).npages == (512 * MiB - 0x100000) >> 12


def test_default_shadow_page_quota_is_kvms_formula():
    """kvm_mmu_calculate_default_mmu_pages: 20 shadow pages per 1000 guest pages, never below 64."""
    assert MachineSpec(ram_mib=512).max_mmu_pages() == 131072 * 20 // 1000
    assert MachineSpec(ram_mib=16).max_mmu_pages() == 81
    assert MachineSpec(ram_mib=512, mmu_pages="unlimited").max_mmu_pages() is None


@pytest.mark.parametrize("field, value", [("pci_hole_start", 0xC1000000), ("framebuffer_mib", 32), ("vcpus", 0),
                                          ("ram_mib", 8), ("nic", "rtl8139"), ("mmu", "tdp")])
def test_impossible_machines_are_refused_naming_the_field(field, value):
    with pytest.raises(kvmmu.InvalidArgument, match=field):
        MachineSpec(**{field: value}).validate()


def _booted(mmu="shadow", policy="generation", host=None, tdp_mmu=True):
    m = Machine(MachineSpec(ram_mib=64, vcpus=1, mmu=mmu, mmio_caching=policy, tdp_mmu=tdp_mmu), host or kvmmu.Host())
    os_ = GuestOS(m, OsParams(boot_console_bytes=0))
    os_.boot()
    return m, os_


def test_in_kernel_lapic_never_exits_to_userspace():
    """The LAPIC is on KVM's MMIO bus: KVM completes the access, no KVM_EXIT_MMIO."""
    m, os_ = _booted()
    v = m.vcpus[0]
    before = v.counters["userspace_exits"], m.lapic.writes
    os_.eoi(os_.cpus[0])
    assert v.counters["userspace_exits"] == before[0]
    assert m.lapic.writes == before[1] + 1 and m.lapic.eois >= 1


def test_userspace_serial_write_is_one_kvm_exit_mmio_at_its_gpa():
    m, os_ = _booted()
    v = m.vcpus[0]
    n = len(m.vm.mmio_log)
    r = v.access(os_.ioremaps["serial"], 1, "write", ord("A"), cpl=0)
    assert [(e.phys_addr, e.len, e.is_write) for e in r.mmio_exit_records] == [(SERIAL_GPA, 1, True)]
    assert len(m.vm.mmio_log) == n + 1 and m.serial.output[-1:] == b"A"


def test_reads_of_no_device_float_to_all_ones():
    m, os_ = _booted()
    va = os_.ioremap(m.vcpus[0], "nothing", 0xFE800000, 4096)
    assert m.vcpus[0].access(va, 4, "read", cpl=0).value == 0xFFFFFFFF


def test_lapic_address_is_kvms_apic_base():
    assert LAPIC_GPA == 0xFEE00000


def _maps_gfn(vm, vcpu, gfn):
    """Some leaf spte maps gfn: an rmap entry (shadow MMU), or the TDP MMU root's walk ends on a leaf."""
    if vm.mmu.rmap.get((0, gfn)):
        return True
    if not vm.tdp_mmu_enabled:
        return False
    walk = vm.mmu.tdp_mmu.get_walk(vcpu.mmu, gfn << 12)
    level, spte = walk[-1]
    return bool(spte & (1 << 11)) and (level == 1 or bool(spte & 0x80))


@pytest.mark.parametrize("mmu,tdp_mmu", [("shadow", True), ("ept", False), ("ept", True)])
def test_swapped_out_page_loses_its_spte_and_comes_back_with_a_swapin(mmu, tdp_mmu):
    """The mmu notifier drops the sptes of a page the host swaps out (kvm_unmap_gfn_range: the rmaps, and
    kvm_tdp_mmu_unmap_gfn_range for the TDP MMU); the next guest access faults, and KVM's fault-in of
    the page is a swap-in (host_swapins +1)."""
    host = kvmmu.Host(memory_limit=1 << 30)
    m, os_ = _booted(mmu, host=host, tdp_mmu=tdp_mmu)
    v = m.vcpus[0]
    gfn = os_.slab[10]
    gva = DIRECT_MAP + (gfn << 12)
    v.access(gva, 8, "write", 5, cpl=0)
    hva = m.vm.memslots.spaces[0].search(gfn).gfn_to_hva(gfn)
    assert _maps_gfn(m.vm, v, gfn)
    assert host.swap_out_pages([hva >> 12]) == 1
    assert not _maps_gfn(m.vm, v, gfn)
    swapins, taken = v.counters["host_swapins"], v.stats["pf_taken"]
    assert v.access(gva, 8, "read", cpl=0).value == 5          # contents survive the swap
    assert v.counters["host_swapins"] == swapins + 1
    assert v.stats["pf_taken"] == taken + 1
    m.vm.audit()


def test_host_over_its_limit_reclaims_and_notifies_kvm():
    """A limit below what the guest touches forces reclaim: pages are swapped out, none stays mapped."""
    host = kvmmu.Host(memory_limit=16 << 20)
    m, os_ = _booted(host=host)
    v = m.vcpus[0]
    for i in range(6000):                                      # ~23 MiB of distinct guest pages
        v.access(DIRECT_MAP + ((0x2000 + i) << 12), 8, "write", i, cpl=0)
    assert host.swapouts > 0
    assert host.over_limit() == 0
    for (as_id, gfn) in list(m.vm.mmu.rmap):
        slot = m.vm.memslots.spaces[as_id].search(gfn)
        assert host.is_resident(slot.gfn_to_hva(gfn) >> 12), "an spte maps a swapped-out page"
    m.vm.audit()
