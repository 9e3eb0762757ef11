"""Protection keys through the full stack, under shadow paging, EPT and NPT (issue 19).

The rule (SDM Vol. 3A 4.6.2): with CR4.PKE=1 in 4- or 5-level paging, a data access to a user-mode
page is checked against PKRU for the key in bits 62:59 of the leaf entry: AD denies every data
access, WD denies writes at CPL3 and supervisor writes when CR0.WP=1.  The #PF error code then has
P and PK (bit 5) with the usual W/U bits.  Under shadow paging the modelled CPU walks KVM's sptes,
so they must carry the guest leaf's key (docs/architecture/kvm-mmu.md, "Protection keys").

The regression cases are the issue's reproducers; the property test draws PKRU, keys, CPL,
CR0.WP, SMAP/AC, page sizes, a prior access and the access kind, and compares every outcome with
the independent oracle (tests/oracle/access_rules.py, which imports nothing from kvmmu).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE, X86_CR4_PKE
from kvmmu.guest.pagetables import RW, US, D, GuestPageTables, P, vm_writer
from tests.fullstack.test_access_fullstack import AD_OF, _rig
from tests.oracle import access_rules as R

FLAVOURS = ("shadow", "ept", "npt")
GVA, GPA = 0x40_0000, 0x20_0000
PK, W, U, PRESENT = 0x20, 0x2, 0x4, 0x1


def _guest(flavour: str, huge: bool, *, wp: bool = True, pkru: int, flags: int = P | RW | US | D, key: int = 1,
           **vm_kw: object) -> kvmmu.Vcpu:
    vm = kvmmu.VM(mmu=flavour, **vm_kw)  # type: ignore[arg-type]
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=0x80_0000)
    pt.map(GVA, GPA, page_size=(2 << 20) if huge else 0x1000, flags=flags, pkey=key)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | (X86_CR0_WP if wp else 0), cr3=pt.cr3,
                   cr4=X86_CR4_PAE | X86_CR4_PKE, efer=EFER_LME | EFER_NX, pkru=pkru)
    return vcpu


def _code(r: kvmmu.AccessResult) -> int | None:
    if r.fault is None:
        return None
    assert r.fault.vector == 14
    return r.fault.error_code


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("huge", [True, False], ids=["2M", "4K"])
def test_cpl3_write_after_cpl0_read_takes_the_pk_fault(flavour: str, huge: bool) -> None:
    """The issue's case: PKRU=0x38 sets WD for key 1 (bit 3); a CPL0 read first, then a CPL3 write:
    #PF with P|W|U|PK = 0x27."""
    v = _guest(flavour, huge, pkru=0x38)
    assert v.access(GVA, 4, "read", cpl=0).fault is None
    assert _code(v.access(GVA, 4, "write", 1, cpl=3)) == PRESENT | W | U | PK
    v.vm.audit()


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("huge", [True, False], ids=["2M", "4K"])
@pytest.mark.parametrize("wp", [True, False], ids=["wp1", "wp0"])
def test_cpl0_write_obeys_wd_only_with_cr0_wp(flavour: str, huge: bool, wp: bool) -> None:
    """A supervisor write to a user page checks WD only when CR0.WP=1: #PF P|W|PK = 0x23, else it
    succeeds (and so does every later one: no livelock on a CPU that runs with CR0.WP=1)."""
    v = _guest(flavour, huge, wp=wp, pkru=0x38)
    assert v.access(GVA, 4, "read", cpl=0).fault is None
    for _ in range(3):
        assert _code(v.access(GVA, 4, "write", 7, cpl=0)) == (PRESENT | W | PK if wp else None)
    if not wp:
        assert v.access(GVA, 4, "read", cpl=0).value == 7
    v.vm.audit()


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("huge", [True, False], ids=["2M", "4K"])
def test_key_0_denied_does_not_stop_a_key_1_page(flavour: str, huge: bool) -> None:
    """PKRU=0x1: key 0 access-disabled, key 1 allowed; a CPL3 read of a key-1 user page succeeds
    (before the fix the shadow spte had key 0 and the access faulted forever: KvmBug)."""
    v = _guest(flavour, huge, pkru=0x1)
    v.vm.write_phys(GPA, b"\x5a\x00\x00\x00")
    r = v.access(GVA, 4, "read", cpl=3)
    assert r.fault is None and r.value == 0x5A
    assert _code(v.access(GVA + 0x1000 if huge else GVA, 4, "write", 1, cpl=3)) is None
    v.vm.audit()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_fetch_filled_translation_still_checks_the_key_of_a_read(flavour: str) -> None:
    """A CPL3 fetch (keys do not apply) fills the TLB; a CPL3 read through it must check key 1's AD."""
    v = _guest(flavour, False, pkru=0x4)                      # AD for key 1
    assert v.access(GVA, 1, "fetch", cpl=3).fault is None
    assert _code(v.access(GVA, 4, "read", cpl=3)) == PRESENT | U | PK


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_cr0_wp0_write_to_a_read_only_user_page_keeps_its_key(flavour: str) -> None:
    """CR0.WP=0: a supervisor write to a read-only user page succeeds; a later supervisor read with
    AD set for the page's key must still fault (SDM 4.6.2), whatever KVM's spte for the write was."""
    v = _guest(flavour, False, wp=False, pkru=0, flags=P | US | D)
    assert v.access(GVA, 4, "write", 9, cpl=0).fault is None
    v.set_sregs(pkru=0x4)
    assert _code(v.access(GVA, 4, "read", cpl=0)) == PRESENT | PK


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_turning_cr4_pke_on_applies_keys_to_translations_made_without(flavour: str) -> None:
    """Sptes and TLB entries built with CR4.PKE=0 (also a CR0.WP=0 kernel-only one) must obey the
    keys once the guest sets CR4.PKE."""
    v = _guest(flavour, False, wp=False, pkru=0x4, flags=P | US | D)
    v.write_cr4(X86_CR4_PAE)
    assert v.access(GVA, 4, "write", 9, cpl=0).fault is None
    assert v.access(GVA, 4, "read", cpl=3).fault is None
    v.write_cr4(X86_CR4_PAE | X86_CR4_PKE)
    assert _code(v.access(GVA, 4, "read", cpl=0)) == PRESENT | PK
    assert _code(v.access(GVA, 4, "read", cpl=3)) == PRESENT | U | PK


# -- the property: random keys and PKRU values against the oracle --------------------------------
_FREE = (R.PTE_RW, R.PTE_USER, R.PTE_A, R.PTE_D, R.PTE_NX, R.PDE_RW, R.PDE_USER, R.PDE_A, R.PDE_D,
         R.PDE_PSE, R.PDE_NX, R.PDPTE_RO, R.EFER_NX, R.CR0_WP, R.CR4_SMEP, R.CR4_SMAP, R.EFLAGS_AC)
_PKRU = st.one_of(st.integers(0, 0xFFFF_FFFF), st.sampled_from([0, 1, 2, 3, 0x38, 0x4, 0x8, 0xC]),
                  st.integers(0, 15).map(lambda k: 1 << (2 * k)), st.integers(0, 15).map(lambda k: 2 << (2 * k)))
_PRIOR = st.one_of(st.none(), st.tuples(st.sampled_from([0, 3]), st.sampled_from(["read", "write", "fetch"])))


@st.composite
def pk_cases(draw: st.DrawFn) -> tuple[str, R.Case]:
    flavour = draw(st.sampled_from(FLAVOURS))
    mode = draw(st.sampled_from(("4level", "4level", "5level", "pae")))
    flags = R.PTE_P | R.PDE_P
    for f in _FREE:
        if draw(st.booleans()):
            flags |= f
    if draw(st.integers(0, 3)):
        flags |= R.PTE_USER | R.PDE_USER          # keys apply to user-mode pages only: mostly those
    if draw(st.integers(0, 9)):
        flags |= R.CR4_PKE
    if draw(st.integers(0, 15)) == 0:
        flags |= draw(st.sampled_from((R.PTE_P, R.PDE_P)))      # clear one P bit, now and then
        flags ^= draw(st.sampled_from((R.PTE_P, R.PDE_P)))
    flags |= draw(st.sampled_from((0, R.USER))) | draw(st.sampled_from((0, R.WRITE, R.FETCH)))
    flags &= R.mode_flags(mode)
    key = draw(st.integers(0, 15) | st.integers(1, 15))
    case = R.Case(mode, flags, 46, AD_OF[flavour], key=key, pkru_value=draw(_PKRU), prior=draw(_PRIOR))
    return flavour, case


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pk_cases())
def test_protection_keys_match_the_oracle(fc: tuple[str, R.Case]) -> None:
    flavour, case = fc
    if not R.is_legal(case):
        return
    _rig(flavour, case.mode, case.maxphyaddr).run(case)
