"""The fuzzer's reference on small hand-built cases, against the rules of docs/spec/x86-access.md and
the SDM (so that a wrong reference cannot pass for a wrong model)."""

from __future__ import annotations

from tests.fuzz import reference as R

ROOT, PDPT, PD, PT, DATA = 0x1000, 0x2000, 0x3000, 0x4000, 0x8000
GVA = 0x0000_0000_0040_0123          # PML4 0, PDPT 0, PD 2, PT 0


def _ref(policy: str = "kvm", pte: int = DATA | R.P | R.RW | R.US, pde_flags: int = R.P | R.RW | R.US) -> R.Reference:
    ref = R.Reference(46, policy)
    ref.phys.slots[0] = R.Slot(0, 0, 0x10_0000, 0, 0x1_0000_0000)
    w = ref.phys.write
    w(ROOT, (PDPT | R.P | R.RW | R.US).to_bytes(8, "little"))
    w(PDPT, (PD | R.P | R.RW | R.US).to_bytes(8, "little"))
    w(PD + 8 * 2, (PT | pde_flags).to_bytes(8, "little"))
    w(PT, pte.to_bytes(8, "little"))
    w(DATA + 0x123, b"\x5a")
    v = R.VcpuRef("v")
    v.regs = R.Regs(mode="4level", cr3=ROOT, wp=True, nxe=True)
    ref.vcpus = [v]
    return ref


def _obs(outs: list[R.Outcome]) -> set[tuple]:
    return {o.observable() for o in outs}


def test_read_of_a_present_page_sets_a_everywhere() -> None:
    ref = _ref()
    (o,) = ref.outcomes(ref.vcpus[0], R.Access(GVA, 1, "read", 0, False))
    assert o.value == 0x5A and o.fault is None
    assert set(o.ad) == {ROOT, PDPT, PD + 16, PT} and all(b == R.A for _, b in o.ad.values())


def test_write_sets_d_on_the_leaf_only() -> None:
    ref = _ref()
    (o,) = ref.outcomes(ref.vcpus[0], R.Access(GVA, 1, "write", 0, False, 7))
    assert o.ad[PT][1] == R.A | R.D and o.ad[PD + 16][1] == R.A and o.data == [(DATA + 0x123, b"\x07")]


def test_user_write_to_read_only_page_is_p_w_u_and_changes_nothing_under_kvm_policy() -> None:
    ref = _ref(pte=DATA | R.P | R.US)
    (o,) = ref.outcomes(ref.vcpus[0], R.Access(GVA, 1, "write", 3, False, 1))
    assert o.fault == (R.PF, R.EC_P | R.EC_W | R.EC_U, GVA) and not o.ad and not o.data


def test_hardware_policy_may_set_a_on_the_upper_levels_of_a_faulting_walk() -> None:
    ref = _ref(policy="hardware", pte=0)
    outs = ref.outcomes(ref.vcpus[0], R.Access(GVA, 1, "read", 0, False))
    assert _obs(outs) == {(None, (R.PF, 0, GVA), ())}
    assert {tuple(sorted(o.ad)) for o in outs} == {(), (ROOT,), (ROOT, PDPT), (ROOT, PDPT, PD + 16)}


def test_nx_without_nxe_is_a_reserved_bit_and_fetch_reports_no_id() -> None:
    ref = _ref(pte=DATA | R.P | R.RW | R.XD)
    ref.vcpus[0].regs.nxe = False
    (o,) = ref.outcomes(ref.vcpus[0], R.Access(GVA, 1, "fetch", 0, False))
    assert o.fault == (R.PF, R.EC_P | R.EC_RSVD, GVA)


def test_smap_implicit_faults_even_with_ac_and_pk_is_added_to_other_faults() -> None:
    ref = _ref()
    regs = ref.vcpus[0].regs
    regs.smap, regs.ac = True, True
    assert ref.outcomes(ref.vcpus[0], R.Access(GVA, 1, "read", 0, False))[0].fault is None
    assert ref.outcomes(ref.vcpus[0], R.Access(GVA, 1, "read", 0, True))[0].fault == (R.PF, R.EC_P, GVA)
    ref = _ref(pte=DATA | R.P | R.US | (1 << 59))       # key 1, read-only
    regs = ref.vcpus[0].regs
    regs.pke, regs.pkru = True, 0b1000                   # WD for key 1
    (o,) = ref.outcomes(ref.vcpus[0], R.Access(GVA, 1, "write", 3, False, 0))
    assert o.fault == (R.PF, R.EC_P | R.EC_W | R.EC_U | R.EC_PK, GVA)


def test_stale_translation_latitude() -> None:
    """A cached translation may be used after the guest changed its PTE, until INVLPG; a write through
    one cached clean walks; a denying one may fault or walk."""
    ref = _ref(pte=DATA | R.P | R.RW | R.US)
    v = ref.vcpus[0]
    (o,) = ref.outcomes(v, R.Access(GVA, 1, "read", 0, False))
    for tr in o.fills:
        v.fill(tr)
    ref.phys.write(PT, (0x9000 | R.P | R.US | R.A).to_bytes(8, "little"))       # remap, read-only
    assert _obs(ref.outcomes(v, R.Access(GVA, 1, "read", 0, False))) == {(0x5A, None, ()), (0, None, ())}
    assert {o.fault for o in ref.outcomes(v, R.Access(GVA, 1, "write", 3, False, 1))} == \
        {(R.PF, R.EC_P | R.EC_W | R.EC_U, GVA)}                                  # clean entry: must walk
    v.invlpg(GVA)
    assert _obs(ref.outcomes(v, R.Access(GVA, 1, "read", 0, False))) == {(0, None, ())}


def test_invlpg_anywhere_in_a_large_page_drops_it() -> None:
    ref = _ref()
    ref.phys.write(PD + 16, (0x20_0000 | R.P | R.RW | R.US | R.PS).to_bytes(8, "little"))    # a 2 MiB page
    v = ref.vcpus[0]
    (o,) = ref.outcomes(v, R.Access(GVA, 1, "read", 0, False))
    assert o.fills[0].size == R.MiB2
    v.fill(o.fills[0])
    assert v.cached(GVA + 0x5000)
    v.invlpg(GVA + 0x1F_0000)
    assert not v.cached(GVA + 0x5000)


def test_page_crossing_access_and_mmio_pieces() -> None:
    ref = _ref()
    ref.phys.write(PT + 8, (0xD000_0000 | R.P | R.RW).to_bytes(8, "little"))    # the next page is MMIO
    v = ref.vcpus[0]
    outs = ref.outcomes(v, R.Access(0x40_0FFC, 16, "write", 0, False, int.from_bytes(bytes(range(16)), "little")))
    ok = {(tuple(o.data), tuple(o.mmio_exit_records)) for o in outs if o.fault is None}    # either page first: the same
    assert len(ok) == 1
    ok = [o for o in outs if o.fault is None]
    assert ok[0].data == [(DATA + 0xFFC, bytes(range(4)))]
    assert [(e.gpa, e.len) for e in ok[0].mmio_exit_records] == [(0xD000_0000, 8), (0xD000_0008, 4)]


def test_canonical_and_32_bit_limits() -> None:
    ref = _ref()
    v = ref.vcpus[0]
    assert ref.address_check(v, R.Access(0x0000_8000_0000_0000, 1, "read", 0, False)) == "gp"
    assert ref.address_check(v, R.Access(0x0000_7FFF_FFFF_FFFC, 8, "read", 0, False)) == "gp"
    v.regs.mode = "32bit"
    assert ref.address_check(v, R.Access(0xFFFF_FFFC, 8, "read", 0, False)) == "gp"
    assert ref.address_check(v, R.Access(1 << 32, 1, "read", 0, False)) == "invalid"
