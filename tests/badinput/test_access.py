"""vcpu.access() and the VMM's view of guest memory with bad arguments.

A bad argument is a kvmmu.InvalidArgument naming the parameter, the value and the rule, raised
before anything happens (no exit counted, no TLB fill, no A bit, no MMIO exit).  A non-canonical
address is not a bad argument: it is a guest access, and the guest gets #GP(0).
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR4_LA57, X86_CR4_PAE
from tests.badinput.snapshot import MMIO_GVA, assert_refused, assert_unchanged, running_vm, vm_state

RAM_GVA = 0x40_0000 - 0x4000

# (id, access() arguments, the parameter the error must name, its value)
BAD_ACCESSES = [
    ("gva-negative", (-1, 4, "read"), {}, "gva", -1),
    ("gva-2^64", (1 << 64, 4, "read"), {}, "gva", 1 << 64),
    ("gva-huge", (1 << 70, 4, "read"), {}, "gva", 1 << 70),
    ("gva-str", ("0x400000", 4, "read"), {}, "gva", "0x400000"),
    ("gva-float", (4096.0, 4, "read"), {}, "gva", 4096.0),
    ("size-0", (RAM_GVA, 0, "read"), {}, "size", 0),
    ("size-3", (RAM_GVA, 3, "read"), {}, "size", 3),
    ("size-32", (RAM_GVA, 32, "read"), {}, "size", 32),
    ("size-negative", (RAM_GVA, -8, "read"), {}, "size", -8),
    ("size-str", (RAM_GVA, "4", "read"), {}, "size", "4"),
    ("size-float", (RAM_GVA, 4.0, "read"), {}, "size", 4.0),
    ("kind-upper", (RAM_GVA, 4, "READ"), {}, "kind", "READ"),
    ("kind-exec", (RAM_GVA, 4, "exec"), {}, "kind", "exec"),
    ("kind-none", (RAM_GVA, 4, None), {}, "kind", None),
    ("write-no-value", (RAM_GVA, 4, "write"), {}, "value", None),
    ("write-value-too-large", (RAM_GVA, 4, "write", 1 << 32), {}, "value", 1 << 32),
    ("write-value-negative", (RAM_GVA, 2, "write", -1), {}, "value", -1),
    ("write-bytes-too-long", (RAM_GVA, 4, "write", b"12345"), {}, "value", b"12345"),
    ("write-bytes-too-short", (RAM_GVA, 8, "write", b"123"), {}, "value", b"123"),
    ("write-str", (RAM_GVA, 4, "write", "abcd"), {}, "value", "abcd"),
    ("read-with-value", (RAM_GVA, 4, "read", 7), {}, "value", 7),
    ("mmio-write-too-large", (MMIO_GVA, 8, "write", 1 << 64), {}, "value", 1 << 64),
    ("cpl-4", (RAM_GVA, 4, "read"), {"cpl": 4}, "cpl", 4),
    ("cpl-negative", (RAM_GVA, 4, "read"), {"cpl": -1}, "cpl", -1),
    ("cpl-str", (RAM_GVA, 4, "read"), {"cpl": "0"}, "cpl", "0"),
]


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
@pytest.mark.parametrize("case", BAD_ACCESSES, ids=[c[0] for c in BAD_ACCESSES])
def test_bad_access_argument_is_refused_before_anything_happens(mmu: str, case: tuple) -> None:
    """access() checks its arguments first: InvalidArgument, and the VM is untouched."""
    _id, args, kw, what, value = case
    vm, vcpu, _pt = running_vm(mmu)
    assert_refused(vm, lambda: vcpu.access(*args, **kw), what, value, f"access{args}")


@pytest.mark.parametrize("mmu", ["shadow", "ept", "npt"])
@pytest.mark.parametrize("mode", ["4level", "5level"])
def test_non_canonical_address_is_a_gp_fault_for_the_guest(mmu: str, mode: str) -> None:
    """SDM Vol. 3A 3.3.7.1: a non-canonical linear address raises #GP(0); it is the guest's fault, not an
    API error, and nothing else happens (no exit to KVM, no MMIO exit, no state change)."""
    vm, vcpu, _pt = running_vm(mmu)
    if mode == "5level":
        vcpu.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE, cr4=X86_CR4_PAE | X86_CR4_LA57, efer=EFER_LME | EFER_NX)
        addrs = [0x0100_0000_0000_0000, 0xFEFF_FFFF_FFFF_F000]
        vcpu.access(0x1000, 4, "read")               # enter the guest once: KVM loads the new root
    else:
        addrs = [0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_FFF8, 0x8000_0000_0000_0000]
    for gva in addrs:
        for kind, value in (("read", None), ("write", 5), ("fetch", None)):
            before = vm_state(vm)
            r = vcpu.access(gva, 4, kind, value)
            assert r.fault is not None and (r.fault.vector, r.fault.error_code) == (13, 0), f"{gva:#x} {kind}: {r}"
            assert r.value is None and not r.mmio_exit_records, r
            assert_unchanged(before, vm_state(vm), f"non-canonical {kind} at {gva:#x}")


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_32bit_mode_linear_address_beyond_4gib_is_refused(mmu: str) -> None:
    """A 32-bit guest (paging off, 32-bit or PAE paging) has 32-bit linear addresses: a larger gva is
    an API error (InvalidArgument), before anything happens."""
    vm, vcpu, _pt = running_vm(mmu)
    vcpu.set_sregs(cr0=X86_CR0_PE, cr4=0, efer=0)
    vcpu.access(0x1000, 4, "read")                   # enter the guest once: KVM loads the new root
    before = vm_state(vm)
    with pytest.raises(kvmmu.InvalidArgument) as info:
        vcpu.access(1 << 32, 4, "read")
    assert str(info.value).startswith("gva=") or "0x100000000" in str(info.value), info.value
    assert_unchanged(before, vm_state(vm), "a 33-bit gva in a 32-bit mode")


# (id, callable on (vm), parameter named, value)
BAD_PHYS = [
    ("write-gpa-negative", lambda vm: vm.write_phys(-1, b"x"), "gpa", -1),
    ("write-gpa-str", lambda vm: vm.write_phys("0", b"x"), "gpa", "0"),
    ("write-unbacked", lambda vm: vm.write_phys(0x3000_0000, b"x"), "gpa", 0x3000_0000),
    ("write-straddles-into-nothing", lambda vm: vm.write_phys((4 << 20) - 2, b"xyz"), "gpa", 4 << 20),
    ("write-data-str", lambda vm: vm.write_phys(0, "abc"), "data", "abc"),
    ("read-gpa-negative", lambda vm: vm.read_phys(-4, 4), "gpa", -4),
    ("read-unbacked", lambda vm: vm.read_phys(0x3000_0000, 4), "gpa", 0x3000_0000),
    ("read-length-negative", lambda vm: vm.read_phys(0, -1), "length", -1),
    ("read-length-str", lambda vm: vm.read_phys(0, "4"), "length", "4"),
]


@pytest.mark.parametrize("case", BAD_PHYS, ids=[c[0] for c in BAD_PHYS])
def test_bad_guest_physical_access_by_the_vmm(case: tuple) -> None:
    """vm.write_phys / vm.read_phys (the VMM's mmap of guest RAM): a gpa outside every memslot, a
    negative length or data that is not bytes is an InvalidArgument, and nothing is written."""
    _id, call, what, value = case
    vm, _vcpu, _pt = running_vm("shadow")
    assert_refused(vm, lambda: call(vm), what, value, _id)
