"""The fuzzer's own checks (world.py) on hand-made states, so that a false alarm cannot pass for a
model bug.  KVM_SET_USER_MEMORY_REGION lets two memslots share a userspace range (World(alias=True):
slot 3 over the table pool), so one host page has two gpas and a TLB entry for it is right when a
guest translation reaches either of them."""

from __future__ import annotations

import kvmmu
from tests.fuzz import reference as R
from tests.fuzz import world as W


def test_tlb_entry_through_an_aliased_slot_is_checked_against_every_gpa_of_its_host_page() -> None:
    w = W.World("A", kvmmu.Host(), "shadow", "generation", "4level", 0, False, None, None, alias=True)
    w.memslot("create", 3, 2, 0)                      # slot 3 at PLACEMENTS[2], over POOL's host pages
    alias_gpa = W.PLACEMENTS[2]
    assert w.ref.phys.slots[3].hva == w.ref.phys.slots[0].hva + W.POOL
    gva = w.lay.gva_pool[0]
    w.pte_write(0, 0, gva, 1, alias_gpa | R.P | R.RW | R.A | R.D, 0)
    w.access(1, gva, 8, "read", 0, False, 0)
    entry = w.vcpus[1].cpu.tlb.get(gva >> 12)
    assert entry is not None and entry[0] == w.hvas[3]  # the CPU cached the translation, to the shared page
    w.check_tlbs(None)                                # gpa POOL (slot 0) or alias_gpa (slot 3): the latter
    # The same entry with the guest's leaf pointing elsewhere has no translation behind it at either gpa.
    w.ref.phys.write(w.entry_address(0, gva, 1), (W.KDATA | R.P | R.RW | R.A | R.D).to_bytes(8, "little"))
    w.ref.vcpus[1].tlb.clear()
    try:
        w.check_tlbs(None)
    except W.Mismatch as e:
        assert f"{W.POOL:#x}/{alias_gpa:#x}" in str(e)
    else:
        raise AssertionError("a TLB entry no guest translation allows passed check_tlbs")
