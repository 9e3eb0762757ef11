"""Register state with bad values: KVM_SET_SREGS (set_sregs), the guest's control-register writes,
INVLPG, PKRU.  Each refusal is a kvmmu.InvalidArgument naming the value and the rule; the vCPU (and
the VM) are exactly as before -- set_sregs validates everything first and applies all at once.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import (
    EFER_LME,
    EFER_NX,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR0_WP,
    X86_CR4_LA57,
    X86_CR4_PAE,
)
from tests.badinput.snapshot import assert_names, assert_refused, assert_unchanged, running_vm, vm_state

PG = X86_CR0_PG | X86_CR0_PE | X86_CR0_WP

# (id, set_sregs keyword arguments, parameter named, value)
BAD_SREGS = [
    ("cr0-negative", dict(cr0=-1), "cr0", -1),
    ("cr0-above-u64", dict(cr0=1 << 64), "cr0", 1 << 64),
    ("cr0-str", dict(cr0="0"), "cr0", "0"),
    ("cr3-negative", dict(cr3=-0x1000), "cr3", -0x1000),
    ("cr3-above-u64", dict(cr3=1 << 64), "cr3", 1 << 64),
    ("cr4-above-u64", dict(cr4=1 << 64), "cr4", 1 << 64),
    ("efer-negative", dict(efer=-1), "efer", -1),
    ("cpl-4", dict(cpl=4), "cpl", 4),
    ("cpl-negative", dict(cpl=-1), "cpl", -1),
    ("cpl-str", dict(cpl="3"), "cpl", "3"),
    ("pkru-negative", dict(pkru=-1), "pkru", -1),
    ("pkru-33-bits", dict(pkru=1 << 32), "pkru", 1 << 32),
    ("pkru-str", dict(pkru="0"), "pkru", "0"),
    ("rflags-negative", dict(rflags=-1), "rflags", -1),
    ("rflags-above-u64", dict(rflags=1 << 64), "rflags", 1 << 64),
    ("rflags-str", dict(rflags="0x2"), "rflags", "0x2"),
    ("la57-without-long-mode", dict(cr0=PG, cr4=X86_CR4_PAE | X86_CR4_LA57, efer=EFER_NX), "cr4",
     X86_CR4_PAE | X86_CR4_LA57),
    ("la57-paging-off", dict(cr0=X86_CR0_PE, cr4=X86_CR4_PAE | X86_CR4_LA57, efer=EFER_LME), "cr4",
     X86_CR4_PAE | X86_CR4_LA57),
    ("long-mode-without-pae", dict(cr0=PG, cr4=0, efer=EFER_LME | EFER_NX), "cr4", 0),
]


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
@pytest.mark.parametrize("case", BAD_SREGS, ids=[c[0] for c in BAD_SREGS])
def test_bad_sregs_are_refused_and_nothing_is_applied(mmu: str, case: tuple) -> None:
    """KVM_SET_SREGS checks every value before changing anything."""
    _id, kw, what, value = case
    vm, vcpu, _pt = running_vm(mmu)
    before = vm_state(vm)
    with pytest.raises(kvmmu.InvalidArgument) as info:
        vcpu.set_sregs(**kw)
    assert_names(info.value, what, value)
    assert_unchanged(before, vm_state(vm), f"set_sregs({kw})")


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_pae_pdpte_with_reserved_bits_is_refused_and_nothing_is_applied(mmu: str) -> None:
    """SDM Vol. 3A 4.4.1: loading CR3 with PAE paging loads the four PDPTEs; a present one with a reserved
    bit (bits 2:1, 8:5, 63, or above MAXPHYADDR) makes the load fail (#GP; here InvalidArgument
    naming the PDPTE), and the vCPU keeps its old state."""
    vm, vcpu, _pt = running_vm(mmu)
    pdpt = 0x30_0000
    bad = 0x31_0000 | 1 | (1 << 7)                  # P and bit 7 (reserved in a PDPTE)
    vm.write_phys(pdpt + 8, bad.to_bytes(8, "little"))
    before = vm_state(vm)
    with pytest.raises(kvmmu.InvalidArgument) as info:
        vcpu.set_sregs(cr0=PG, cr3=pdpt, cr4=X86_CR4_PAE, efer=EFER_NX)
    assert_names(info.value, "pdpte", bad)
    assert_unchanged(before, vm_state(vm), "set_sregs with a reserved PDPTE")


# (id, call on the vCPU, parameter named, value)
BAD_GUEST_WRITES = [
    ("cr3-negative", lambda v: v.write_cr3(-1), "cr3", -1),
    ("cr3-above-u64", lambda v: v.write_cr3(1 << 64), "cr3", 1 << 64),
    ("cr3-str", lambda v: v.write_cr3("0"), "cr3", "0"),
    ("cr0-negative", lambda v: v.write_cr0(-1), "cr0", -1),
    ("cr0-str", lambda v: v.write_cr0("1"), "cr0", "1"),
    ("cr4-above-u64", lambda v: v.write_cr4(1 << 64), "cr4", 1 << 64),
    ("cr4-str", lambda v: v.write_cr4("1"), "cr4", "1"),
    ("efer-negative", lambda v: v.write_efer(-1), "efer", -1),
    ("efer-str", lambda v: v.write_efer("1"), "efer", "1"),
    ("invlpg-negative", lambda v: v.invlpg(-1), "gva", -1),
    ("invlpg-above-u64", lambda v: v.invlpg(1 << 64), "gva", 1 << 64),
    ("invlpg-float", lambda v: v.invlpg(4096.0), "gva", 4096.0),
]


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
@pytest.mark.parametrize("case", BAD_GUEST_WRITES, ids=[c[0] for c in BAD_GUEST_WRITES])
def test_bad_control_register_value_is_refused_before_anything_happens(mmu: str, case: tuple) -> None:
    """write_cr0/cr3/cr4/efer and invlpg refuse a value that is not an unsigned 64-bit integer,
    before the exit is counted or any state changes."""
    _id, call, what, value = case
    vm, vcpu, _pt = running_vm(mmu)
    before = vm_state(vm)
    with pytest.raises(kvmmu.InvalidArgument) as info:
        call(vcpu)
    assert_names(info.value, what, value)
    assert_unchanged(before, vm_state(vm), _id)


@pytest.mark.parametrize("pkru", [0, 0x5555_5554, 0xFFFF_FFFF])
def test_every_32_bit_pkru_is_accepted(pkru: int) -> None:
    """PKRU is a 32-bit register: every value in [0, 2^32) is valid."""
    _vm, vcpu, _pt = running_vm("shadow")
    vcpu.set_sregs(pkru=pkru)
    assert vcpu.pkru == pkru


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
@pytest.mark.parametrize("reg, value, mentions", [
    ("cr0", (1 << 32) | 0x8001_0011, "63:32"),                 # SDM 2.5: CR0[63:32] reserved
    ("cr0", 0x8000_0000, "CR0.PE"),                            # PG without PE
    ("cr0", 0x2000_0011 | 0x8000_0000, "CR0.CD"),              # NW without CD
    ("cr4", 0x20 | (1 << 15), "reserved CR4"),                 # bit 15 is reserved
    ("cr4", 0x20 | (1 << 40), "reserved CR4"),
    ("efer", 0x900 | (1 << 1), "reserved EFER"),               # EFER bit 1 is reserved
])
def test_reserved_control_register_bits_are_a_gp_and_change_nothing(mmu: str, reg: str, value: int,
                                                                   mentions: str) -> None:
    """MOV to CR0/CR4 and WRMSR(EFER) with a reserved bit or an invalid combination #GP (SDM Vol. 3A
    2.5 / 2.2.1); kvmmu raises InvalidArgument for the guest's write and for KVM_SET_SREGS alike."""
    vm, vcpu, _ = running_vm(mmu)
    for op in (lambda: getattr(vcpu, f"write_{reg}")(value), lambda: vcpu.set_sregs(**{reg: value})):
        assert_refused(vm, op, reg, value, f"{reg}={value:#x}", match=mentions)
