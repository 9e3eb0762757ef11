"""KVM_SET_USER_MEMORY_REGION with bad parameters: every rule of kvm_set_memory_region (spec 3.13).

Each refusal is a kvmmu.MemslotError (an InvalidArgument, a KvmmuError) naming the parameter, its
value and the rule, with KVM's errno; and the VM is exactly as it was: memslots, generations,
KVM's statistics, shadow pages (and their contents), rmaps, every vCPU's registers, TLB and MMIO
cache, guest memory.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.kvm.memslots import KVM_MEM_MAX_NR_PAGES, KVM_USER_MEM_SLOTS
from tests.badinput.snapshot import assert_names, assert_unchanged, running_vm, vm_state

RO = kvmmu.KVM_MEM_READONLY
LIVE0 = "<slot 0's userspace_addr>"
LIVE1 = "<slot 1's userspace_addr>"

# (id, kwargs of set_user_memory_region, the parameter the error must name, its value, errno)
CASES = [
    ("slot-not-int", dict(slot="1", guest_phys_addr=64 << 20, memory_size=0x1000), "slot", "1", "EINVAL"),
    ("slot-bool", dict(slot=True, guest_phys_addr=64 << 20, memory_size=0x1000), "slot", True, "EINVAL"),
    ("slot-negative", dict(slot=-1, guest_phys_addr=64 << 20, memory_size=0x1000), "slot", -1, "EINVAL"),
    ("slot-above-u64", dict(slot=1 << 64, guest_phys_addr=64 << 20, memory_size=0x1000), "slot", 1 << 64, "EINVAL"),
    ("slot-address-space", dict(slot=2 << 16, guest_phys_addr=64 << 20, memory_size=0x1000), "slot", 2 << 16,
     "EINVAL"),
    ("slot-id-too-big", dict(slot=KVM_USER_MEM_SLOTS, guest_phys_addr=64 << 20, memory_size=0x1000), "slot",
     KVM_USER_MEM_SLOTS, "EINVAL"),
    ("flags-guest-memfd", dict(slot=2, guest_phys_addr=64 << 20, memory_size=0x1000, flags=4), "flags", 4,
     "EINVAL"),
    ("flags-internal-invalid", dict(slot=2, guest_phys_addr=64 << 20, memory_size=0x1000, flags=1 << 16), "flags",
     1 << 16, "EINVAL"),
    ("flags-negative", dict(slot=2, guest_phys_addr=64 << 20, memory_size=0x1000, flags=-1), "flags", -1,
     "EINVAL"),
    ("size-not-pages", dict(slot=2, guest_phys_addr=64 << 20, memory_size=0x1001), "memory_size", 0x1001,
     "EINVAL"),
    ("size-negative", dict(slot=2, guest_phys_addr=64 << 20, memory_size=-0x1000), "memory_size", -0x1000,
     "EINVAL"),
    ("size-float", dict(slot=2, guest_phys_addr=64 << 20, memory_size=4096.0), "memory_size", 4096.0, "EINVAL"),
    ("size-too-many-pages", dict(slot=2, guest_phys_addr=64 << 20, memory_size=(KVM_MEM_MAX_NR_PAGES + 1) << 12),
     "memory_size", (KVM_MEM_MAX_NR_PAGES + 1) << 12, "EINVAL"),
    ("gpa-not-aligned", dict(slot=2, guest_phys_addr=(64 << 20) + 0x800, memory_size=0x1000), "guest_phys_addr",
     (64 << 20) + 0x800, "EINVAL"),
    ("gpa-not-int", dict(slot=2, guest_phys_addr="0", memory_size=0x1000), "guest_phys_addr", "0", "EINVAL"),
    ("gpa-overflows", dict(slot=2, guest_phys_addr=(1 << 64) - 0x1000, memory_size=0x2000), "guest_phys_addr",
     (1 << 64) - 0x1000, "EINVAL"),
    ("gpa-beyond-max-gfn", dict(slot=2, guest_phys_addr=1 << 52, memory_size=0x1000), "guest_phys_addr", 1 << 52,
     "EINVAL"),
    ("uaddr-not-aligned", dict(slot=2, guest_phys_addr=64 << 20, memory_size=0x1000, userspace_addr="+0x10"),
     "userspace_addr", "+0x10", "EINVAL"),
    ("uaddr-outside-vmm", dict(slot=2, guest_phys_addr=64 << 20, memory_size=0x1000, userspace_addr=0x1000),
     "userspace_addr", 0x1000, "EINVAL"),
    ("delete-missing", dict(slot=7, guest_phys_addr=0, memory_size=0), "slot", 7, "EINVAL"),
    ("live-new-backing", dict(slot=0, guest_phys_addr=0, memory_size=4 << 20, userspace_addr="+0x100000"),
     "userspace_addr", "+0x100000", "EINVAL"),
    ("live-resize", dict(slot=0, guest_phys_addr=0, memory_size=8 << 20, userspace_addr=LIVE0), "memory_size",
     8 << 20, "EINVAL"),
    ("live-readonly-off", dict(slot=1, guest_phys_addr=32 << 20, memory_size=0x10000, flags=0,
                               userspace_addr=LIVE1), "flags", 0, "EINVAL"),
    ("live-readonly-on", dict(slot=0, guest_phys_addr=0, memory_size=4 << 20, flags=RO, userspace_addr=LIVE0),
     "flags", RO, "EINVAL"),
    ("create-overlaps", dict(slot=2, guest_phys_addr=2 << 20, memory_size=4 << 20), "guest_phys_addr", 2 << 20,
     "EEXIST"),
    ("move-overlaps", dict(slot=1, guest_phys_addr=1 << 20, memory_size=0x10000, flags=RO, userspace_addr=LIVE1),
     "guest_phys_addr", 1 << 20, "EEXIST"),
]


def _resolve(vm: kvmmu.VM, kw: dict, value: object) -> tuple[dict, object]:
    """Fill in the live slots' backing addresses (and offsets from slot 0's) only known at run time."""
    base = vm.memslots.slot(0).userspace_addr
    subs = {LIVE0: base, LIVE1: vm.memslots.slot(1).userspace_addr}
    out = {}
    for k, v in kw.items():
        if isinstance(v, str) and v.startswith("+0x"):
            v = base + int(v[1:], 16)
        out[k] = subs.get(v, v) if isinstance(v, str) else v
    if isinstance(value, str) and value.startswith("+0x"):
        value = base + int(value[1:], 16)
    return out, value


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rejected_memslot_change_names_the_rule_and_changes_nothing(mmu: str, case: tuple) -> None:
    """Each rule of kvm_set_memory_region refuses the change with its errno; the VM is untouched."""
    _id, kw, what, value, errno_name = case
    vm, _vcpu, _pt = running_vm(mmu)
    kw, value = _resolve(vm, kw, value)
    before = vm_state(vm)
    with pytest.raises(kvmmu.MemslotError) as info:
        vm.set_user_memory_region(**kw)
    err = info.value
    assert isinstance(err, kvmmu.InvalidArgument) and isinstance(err, kvmmu.KvmmuError)
    assert_names(err, what, value)
    assert err.errno_name == errno_name, f"-{err.errno_name}, KVM says -{errno_name}: {err}"
    assert_unchanged(before, vm_state(vm), f"memslot change {kw}")


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_a_memslot_callback_that_is_not_callable_changes_nothing(mmu: str) -> None:
    """`during_update` must be callable; a bad one is refused before the swap starts (the model
    publishes the slot and leaves the generation's update-in-progress flag set forever)."""
    vm, _vcpu, _pt = running_vm(mmu)
    before = vm_state(vm)
    with pytest.raises(kvmmu.InvalidArgument) as info:
        vm.set_user_memory_region(2, 64 << 20, 0x1000, during_update=5)  # type: ignore[arg-type]
    assert_names(info.value, "during_update", 5)
    assert_unchanged(before, vm_state(vm), "memslot change with during_update=5")


def test_deleted_memslot_is_unreachable_when_the_call_returns() -> None:
    """After KVM_SET_USER_MEMORY_REGION(size 0) returns, the slot's gpas are MMIO: a load there
    exits to the VMM, even through a translation the vCPU used a moment before."""
    for mmu in ("shadow", "ept", "npt"):
        for policy in ("off", "zap", "generation"):
            vm, vcpu, _pt = running_vm(mmu, mmio_caching=policy)
            gva = 0x40_0000 - 0x4000 + 0x10
            assert not vcpu.access(gva, 8, "read").mmio_exit_records
            vm.set_user_memory_region(0, 0, 0)
            vm.set_user_memory_region(2, 64 << 20, 0x1000)       # and something else happens meanwhile
            r = vcpu.access(gva, 8, "read")
            # The vCPU may still hold gva -> gpa 0x200010 (a TLB entry) or walk the (now missing) tables.
            assert r.fault is not None or [e.phys_addr for e in r.mmio_exit_records] == [0x20_0010], \
                f"{mmu}/{policy}: the deleted slot's page was still reachable: {r}"
