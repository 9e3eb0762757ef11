"""Guest-physical address width: MMIO sptes, TDP table depth and memslot limits (issue 15, F1-F4).

Every guest access ends in a result (a value, a fault or an exit), an MMIO exit names the gpa the
guest's own tables produced, and no gpa reaches another gpa's memory, whatever the host's and the
guest's MAXPHYADDR and the TDP depth.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_LA57, X86_CR4_PAE
from kvmmu.guest.pagetables import GuestPageTables, vm_writer
from kvmmu.kvm.mmu.spte import ept_masks, get_mmio_spte_gfn, make_mmio_spte, shadow_masks

GVA = 0x400000
RAM = 4 << 20


def _guest(vm: kvmmu.VM, gpa: int, vcpus: int = 1, la57: bool = False) -> list[kvmmu.Vcpu]:
    """Slot 0 holds [0, 4 MiB) and the guest's tables; GVA maps `gpa`."""
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=RAM)
    pt = GuestPageTables("5level" if la57 else "4level", *vm_writer(vm), pool=0x100000)
    pt.map(GVA, gpa)
    out = []
    for _ in range(vcpus):
        v = vm.create_vcpu()
        v.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr3=pt.cr3,
                    cr4=X86_CR4_PAE | (X86_CR4_LA57 if la57 else 0), efer=EFER_LME | EFER_NX)
        out.append(v)
    return out


# -- F1: an MMIO gpa above the host's MAXPHYADDR ------------------------------------------------------
def test_f1_mmio_gpa_above_host_maxphyaddr_is_not_cached_in_an_spte() -> None:
    """Shadow paging, guest MAXPHYADDR 52 on a 46-bit host: the MMIO spte cannot hold gpa bit 51
    (get_mmio_spte_gfn keeps bits 45:12), so KVM must emulate without an MMIO spte; a second vCPU
    (no MMIO cache) then exits to the guest's own gpa, not to RAM gpa 0x200000."""
    vm = kvmmu.VM(mmu="shadow", guest_maxphyaddr=52)
    gpa = (1 << 51) | 0x200000
    v0, v1 = _guest(vm, gpa, vcpus=2)
    vm.mmio_handler = lambda e: 0
    v0.access(GVA, 4, "read")
    v1.access(GVA, 4, "read")
    assert [e.phys_addr for e in vm.mmio_log] == [gpa, gpa]
    assert v0.stats["pf_mmio_spte_created"] == v1.stats["pf_mmio_spte_created"] == 0
    assert vm.effective["mmio_max_gfn"] == (1 << 34) - 1
    vm.audit()


def test_effective_parameters_show_kvms_mmio_decision() -> None:
    """kvm_mmu_reset_all_pte_masks: with 52 host PA bits no reserved PA bit is left, so shadow/NPT
    MMIO caching is off; EPT marks MMIO by W+X without R and keeps it."""
    host52 = kvmmu.Host(maxphyaddr=52)
    assert kvmmu.VM(mmu="shadow", host=host52).effective["enable_mmio_caching"] is False
    assert kvmmu.VM(mmu="npt", host=kvmmu.Host(maxphyaddr=52)).effective["enable_mmio_caching"] is False
    assert kvmmu.VM(mmu="ept", host=kvmmu.Host(maxphyaddr=52)).effective["enable_mmio_caching"] is True
    assert kvmmu.VM(mmu="shadow", mmio_caching="off").effective["enable_mmio_caching"] is False


@given(host_bits=st.integers(36, 52), gfn=st.integers(0, (1 << 40) - 1), ept=st.booleans(), zap=st.booleans())
def test_an_mmio_spte_returns_every_gfn_kvm_may_cache(host_bits: int, gfn: int, ept: bool, zap: bool) -> None:
    """Property: a gfn at or below `mmio_max_gfn` survives make_mmio_spte/get_mmio_spte_gfn; the limit
    never exceeds the host's MAXPHYADDR (KVM's shadow_nonpresent_or_rsvd_lower_gfn_mask)."""
    gen = None if zap else shadow_masks().gen
    m = (ept_masks if ept else shadow_masks)(host_bits, gen)
    assert m.mmio_max_gfn < 1 << (host_bits - 12)
    if gfn <= m.mmio_max_gfn:
        assert get_mmio_spte_gfn(m, make_mmio_spte(m, gfn, 6, 0x5A5A5)) == gfn


# -- F2, F3, F4: TDP depth, canonical checks, memslot limits -----------------------------------------
def test_f2_ept4_guest_pte_beyond_48_bits_ends_in_an_mmio_exit() -> None:
    """EPT with 4 levels, guest MAXPHYADDR 52: a gpa >= 2^48 is outside what the table translates; no
    memslot can be there, so the access is emulated as MMIO (an exit naming that gpa), not refused."""
    vm = kvmmu.VM(mmu="ept", guest_maxphyaddr=52)
    (v,) = _guest(vm, 1 << 48)
    r = v.access(GVA, 4, "read")
    assert r.fault is None and [e.phys_addr for e in r.exits] == [1 << 48]
    vm.audit()


@pytest.mark.parametrize("tdp_mmu", [True, False], ids=["tdp_mmu", "legacy"])
def test_f2_a_gpa_past_the_tdp_reach_does_not_alias_a_low_gfn(tdp_mmu: bool) -> None:
    """Found by the fuzzer when the TDP MMU landed: the access to 2^48 + 0x3000 is emulated, but an
    MMIO spte for it (a 52-bit host can hold that gfn in one) would sit where the 4-level table
    indexes gfn mod 2^36, i.e. on gfn 3, and a later read of RAM gpa 0x3000 would then exit as MMIO.
    No gpa may reach another gpa's memory."""
    vm = kvmmu.VM(mmu="ept", guest_maxphyaddr=52, tdp_mmu=tdp_mmu, host=kvmmu.Host(maxphyaddr=52))
    (v,) = _guest(vm, (1 << 48) | 0x3000)
    vm.mmio_handler = lambda e: 0
    for _ in range(2):
        assert v.access(GVA, 4, "read").fault is None
    vm.write_phys(0x3000, (0x5EED).to_bytes(4, "little"))
    vm.audit()
    v.set_sregs(cr0=X86_CR0_PE, cr3=0, cr4=0, efer=0)          # paging off: gva = gpa
    r = v.access(0x3000, 4, "read")
    assert r.value == 0x5EED and [e.phys_addr for e in vm.mmio_log] == [(1 << 48) | 0x3000] * 2


def test_f3_npt_reaches_a_slot_at_2_pow_47() -> None:
    """NPT tables translate gpas, which have no canonical form: a slot at 2^47 (bit 47 set, accepted
    by a 52-bit host with 4-level NPT) is mapped, not "non-canonical" forever."""
    vm = kvmmu.VM(mmu="npt", guest_maxphyaddr=52, host=kvmmu.Host(maxphyaddr=52))
    (v,) = _guest(vm, 1 << 47)
    vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 47, memory_size=0x1000)
    vm.write_phys(1 << 47, (0x11223344).to_bytes(4, "little"))
    assert v.access(GVA, 4, "read").value == 0x11223344
    vm.audit()


@pytest.mark.parametrize("mmu", ["npt", "ept"])
def test_f4_a_slot_beyond_what_4_level_tdp_translates_is_refused(mmu: str) -> None:
    """kvm_arch_prepare_memory_region refuses a slot above kvm_mmu_max_gfn; with 4-level TDP a slot at
    2^48 would be indexed modulo 2^48 and alias gpa 0, so it is beyond the limit (5 levels: accepted)."""
    vm = kvmmu.VM(mmu=mmu, guest_maxphyaddr=52, host=kvmmu.Host(maxphyaddr=52))
    with pytest.raises(kvmmu.MemslotError, match="largest gfn"):
        vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 48, memory_size=0x1000)
    vm5 = kvmmu.VM(mmu=mmu, guest_maxphyaddr=52, host=kvmmu.Host(maxphyaddr=52), tdp_level=5)
    vm5.set_user_memory_region(slot=1, guest_phys_addr=1 << 48, memory_size=0x1000)


def test_f4_gpa_0_keeps_its_own_memory_next_to_a_high_slot() -> None:
    """5-level NPT with a slot at 2^48: gpa 0 and gpa 2^48 are different pages."""
    vm = kvmmu.VM(mmu="npt", guest_maxphyaddr=52, host=kvmmu.Host(maxphyaddr=52), tdp_level=5)
    (v,) = _guest(vm, 1 << 48)
    vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 48, memory_size=0x1000)
    vm.write_phys(0, b"\x01\0\0\0")
    vm.write_phys(1 << 48, b"\x02\0\0\0")
    assert v.access(GVA, 4, "read").value == 2
    assert vm.read_phys(0, 4) == b"\x01\0\0\0"
    vm.audit()


def test_shadow_paging_accepts_any_52_bit_slot() -> None:
    """kvm_mmu_max_gfn without TDP is 52 bits whatever the host: shadow sptes never hold a gfn."""
    vm = kvmmu.VM(mmu="shadow", guest_maxphyaddr=52)
    (v,) = _guest(vm, (1 << 51) | 0x5000)
    vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 51, memory_size=0x10000)
    vm.write_phys((1 << 51) | 0x5000, b"\x07\0\0\0")
    assert v.access(GVA, 4, "read").value == 7
    vm.audit()


@settings(max_examples=60, deadline=None)
@given(mmu=st.sampled_from(["shadow", "ept", "npt"]), host_bits=st.sampled_from([39, 46, 48, 52]),
       guest_bits=st.sampled_from([36, 46, 48, 52]), tdp_level=st.sampled_from([4, 5]),
       gpa_bit=st.integers(23, 51), slot_bit=st.integers(23, 51), kind=st.sampled_from(["read", "write"]))
def test_every_gpa_ends_in_a_result_of_its_own(mmu: str, host_bits: int, guest_bits: int, tdp_level: int,
                                              gpa_bit: int, slot_bit: int, kind: str) -> None:
    """Property: map GVA at 2^gpa_bit and try a one-page slot at 2^slot_bit.  The slot is accepted iff
    it ends at or below kvm_mmu_max_gfn; the access ends in a value, a guest #PF (a PTE bit at or above
    the guest's MAXPHYADDR is reserved) or MMIO exits naming exactly that gpa; RAM is the slot's own
    page; vm.audit() holds."""
    vm = kvmmu.VM(mmu=mmu, guest_maxphyaddr=guest_bits, host=kvmmu.Host(maxphyaddr=host_bits),
                  tdp_level=tdp_level)
    gpa = (1 << gpa_bit) | 0x3000
    (v,) = _guest(vm, gpa, la57=False)
    width = 52 if mmu == "shadow" else min(host_bits, 12 + 9 * tdp_level)
    slot_gpa = 1 << slot_bit
    if slot_gpa + 0x10000 <= 1 << width:
        vm.set_user_memory_region(slot=1, guest_phys_addr=slot_gpa, memory_size=0x10000)
        vm.write_phys(slot_gpa + 0x3000, b"\xAB\xCD\0\0")
    else:
        with pytest.raises(kvmmu.MemslotError):
            vm.set_user_memory_region(slot=1, guest_phys_addr=slot_gpa, memory_size=0x10000)
    vm.mmio_handler = lambda e: 0x5555
    backed = vm.memslots.spaces[0].search(gpa >> 12) is not None
    r = v.access(GVA, 4, kind, 0x77 if kind == "write" else None)
    if gpa >> guest_bits:
        assert r.fault is not None and r.fault.vector == 14 and r.fault.error_code & 8   # PFERR_RSVD
    elif backed:
        assert r.fault is None and not r.exits
        want = 0x77 if kind == "write" else (0xCDAB if gpa == slot_gpa + 0x3000 else 0)
        assert int.from_bytes(vm.read_phys(gpa, 4), "little") == (0x77 if kind == "write" else want)
    else:
        assert r.fault is None and [e.phys_addr for e in r.exits] == [gpa]
    vm.audit()
