"""KVM's module parameters as a host configuration (kvmmu.KvmParams), and the fast MMIO bus.

Sources: kvm_mmu_reset_all_pte_masks / kvm_mmu_set_mmio_spte_mask (no reserved PA bit with
MAXPHYADDR 52 on shadow paging and NPT: enable_mmio_caching is cleared), kvm_assign_ioeventfd
(length 0 also registers on KVM_FAST_MMIO_BUS; a datamatch needs a length), ioeventfd_in_range, and
VMX's handle_ept_misconfig (the fast bus before kvm_mmu_page_fault, trace_kvm_fast_mmio, the
instruction skipped).  SVM's npf_interception has no such shortcut.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import X86_CR0_PE

G = 0xFE00_0000


def _vm(**kw: object) -> tuple[kvmmu.VM, kvmmu.Vcpu]:
    vm = kvmmu.VM(**kw)  # type: ignore[arg-type]
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    exits: list = []
    vm.mmio_handler = lambda e: exits.append(e)
    vm.exits = exits  # type: ignore[attr-defined]
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PE)
    vcpu.access(0x1000, 4, "read")
    vm.trace.enable()
    return vm, vcpu


@pytest.mark.parametrize("params,mmu,policy,tdp", [
    (kvmmu.KvmParams(), "ept", "generation", True),
    (kvmmu.KvmParams(ept=False), "shadow", "generation", False),
    (kvmmu.KvmParams(vendor="amd", tdp_mmu=False), "npt", "generation", False),
    (kvmmu.KvmParams(vendor="amd", npt=False, mmio_caching=False), "shadow", "off", False),
])
def test_params_map_onto_the_vm_arguments(params: kvmmu.KvmParams, mmu: str, policy: str, tdp: bool) -> None:
    vm = kvmmu.VM(params=params)
    assert (vm.flavour, vm.mmio_caching, vm.tdp_mmu_enabled) == (mmu, policy, tdp)
    assert vm.params.vendor == params.vendor and vm.params.mmio_caching == (policy != "off")


def test_params_readback_and_header() -> None:
    vm = kvmmu.VM(params=kvmmu.KvmParams(vendor="amd"))
    assert vm.params.sysfs() == {"kvm": {"tdp_mmu": "Y", "mmio_caching": "Y"}, "kvm_amd": {"npt": "Y"}}
    assert vm.params.header() == "kvm.tdp_mmu=Y kvm.mmio_caching=Y kvm_amd.npt=Y"
    assert kvmmu.VM(mmu="shadow").params.tdp_mmu is False      # no TDP: the VM does not use the TDP MMU


@pytest.mark.parametrize("kw,bad", [
    ({"params": kvmmu.KvmParams(), "mmu": "npt"}, "mmu"),
    ({"params": kvmmu.KvmParams(mmio_caching=False), "mmio_caching": "generation"}, "mmio_caching"),
    ({"params": kvmmu.KvmParams(), "tdp_mmu": False}, "tdp_mmu"),
    ({"params": "tdp_mmu=Y"}, "params"),
    ({"tdp_mmu": 1}, "tdp_mmu"),
])
def test_contradicting_arguments_are_refused(kw: dict, bad: str) -> None:
    with pytest.raises(kvmmu.InvalidArgument) as info:
        kvmmu.VM(**kw)
    assert info.value.what == bad


@pytest.mark.parametrize("field,value", [("tdp_mmu", "Y"), ("vendor", "via")])
def test_bad_params_are_refused(field: str, value: object) -> None:
    with pytest.raises(kvmmu.InvalidArgument) as info:
        kvmmu.KvmParams(**{field: value})
    assert info.value.what == field


@pytest.mark.parametrize("mmu,enabled", [("shadow", False), ("npt", False), ("ept", True)])
def test_maxphyaddr_52_leaves_no_reserved_bit_for_mmio_sptes(mmu: str, enabled: bool) -> None:
    """With 52 physical-address bits there is no reserved PA bit: KVM clears enable_mmio_caching for
    shadow paging and NPT (the readback shows N) and every MMIO access is a full fault; EPT's MMIO
    sptes are misconfigurations (W without R) and need none."""
    vm, vcpu = _vm(mmu=mmu, host=kvmmu.Host(maxphyaddr=52))
    assert vm.params.mmio_caching is enabled
    for _ in range(3):
        vcpu.access(G + 0x100, 4, "read")
    assert vcpu.stats["pf_mmio_spte_created"] == (1 if enabled else 0)
    assert vcpu.stats["pf_emulate"] == (1 if enabled else 3)


def test_ioeventfd_arguments() -> None:
    vm = kvmmu.VM(mmu="ept")
    for kw, bad in (({"length": 3}, "ioeventfd length"), ({"length": 0, "datamatch": 1}, "ioeventfd datamatch"),
                    ({"length": 2, "datamatch": 1 << 16}, "ioeventfd datamatch")):
        with pytest.raises(kvmmu.InvalidArgument) as info:
            vm.ioeventfd(G, **kw)
        assert info.value.what == bad
    assert not vm.iobus.ranges and not vm.fast_mmio_bus.ranges


@pytest.mark.parametrize("tdp_mmu", [True, False])
def test_ept_doorbell_takes_the_fast_mmio_bus(tdp_mmu: bool) -> None:
    """EPT: the first write faults (no MMIO spte yet), installs the MMIO spte and is emulated: the
    emulator's KVM_MMIO_BUS write signals the ioeventfd.  Every later write is an EPT misconfiguration
    that KVM_FAST_MMIO_BUS completes at once: kvm_fast_mmio, no pf_*, no emulation, no MMIO cache."""
    vm, vcpu = _vm(mmu="ept", tdp_mmu=tdp_mmu)
    fd = vm.ioeventfd(G, 0)
    vcpu.access(G, 2, "write", 1)
    emul = vcpu.stats["insn_emulation"]
    before, counters = vcpu.stats.snapshot(), vcpu.counters.snapshot()
    for q in range(5):
        r = vcpu.access(G, 4 if q % 2 else 2, "write", q)
        assert r.ok and not r.mmio_exit_records
    d = kvmmu.VM.delta({"v": before}, {"v": vcpu.stats.snapshot()})["v"]
    assert d == {"exits": 5}
    assert vcpu.counters["fast_mmio"] - counters["fast_mmio"] == 5 and vcpu.stats["insn_emulation"] == emul
    assert vcpu.counters["mmio_cache_hits"] == counters["mmio_cache_hits"]
    assert (fd.signals, fd.fast_signals) == (6, 5) and not vm.exits
    assert vm.trace.names().count("kvm_fast_mmio") == 5


def test_npt_has_no_fast_mmio_bus() -> None:
    """SVM: the #NPF with RSVD goes through the MMU's fast path (the MMIO cache) and the emulator,
    whose KVM_MMIO_BUS write signals the same length-0 ioeventfd."""
    vm, vcpu = _vm(mmu="npt")
    fd = vm.ioeventfd(G, 0)
    taken = vcpu.stats["pf_taken"]
    for q in range(3):
        vcpu.access(G, 2, "write", q)
    assert (fd.signals, fd.fast_signals) == (3, 0) and vcpu.counters["fast_mmio"] == 0
    assert vcpu.stats["pf_taken"] - taken == 1 and vcpu.counters["mmio_cache_hits"] >= 2
    assert "kvm_fast_mmio" not in vm.trace.names()


def test_without_mmio_caching_ept_has_no_misconfiguration_to_shortcut() -> None:
    """mmio_caching off: no MMIO spte, so every access is an EPT violation and a full fault; the
    ioeventfd is reached through the emulator only."""
    vm, vcpu = _vm(mmu="ept", mmio_caching="off")
    fd = vm.ioeventfd(G, 0)
    taken = vcpu.stats["pf_taken"]
    for q in range(3):
        vcpu.access(G, 2, "write", q)
    assert (fd.signals, fd.fast_signals, vcpu.stats["pf_taken"] - taken) == (3, 0, 3)


def test_a_sized_ioeventfd_with_datamatch_is_not_on_the_fast_bus() -> None:
    """Only length 0 goes on KVM_FAST_MMIO_BUS; a sized one matches its size and datamatch value."""
    vm, vcpu = _vm(mmu="ept")
    fd = vm.ioeventfd(G, 2, datamatch=7)
    vcpu.access(G, 2, "write", 7)
    vcpu.access(G, 2, "write", 7)
    vcpu.access(G, 2, "write", 8)
    vcpu.access(G, 4, "write", 7)
    assert (fd.signals, fd.fast_signals) == (2, 0) and len(vm.exits) == 2
    assert not vm.fast_mmio_bus.ranges
