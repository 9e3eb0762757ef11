"""The write-intent access kind, ``vcpu.access(gva, size, "rmw")``: the load of a read-modify-write,
which the CPU translates for writing.  Expected values from the SDM and KVM's source:

- SDM Vol. 3A 4.7: a #PF error code has W=1 when the access causing the fault was a write, and a
  read-modify-write's load is done with write intent (the fault comes before anything is loaded);
- arch/x86/kvm/mmu/paging_tmpl.h, FNAME(walk_addr_generic): the walker sets a gpte's D bit only
  for a write fault (PFERR_WRITE_MASK in the error code);
- the load itself stores nothing: guest memory is unchanged after it.
"""

from __future__ import annotations

import pytest

from kvmmu.guest.pagetables import RW, US, A, D, P
from tests.fuzz.test_found_bugs import DATA, LONG_MODE, Guest, pf


def _guest(mmu: str, flags: int) -> tuple[Guest, int]:
    g = Guest(mmu)
    pte = g.pt.map(0x40_0000, 0x50_0000, flags=flags)
    g.vm.write_phys(0x50_0010, DATA.to_bytes(8, "little"))
    g.vcpu.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    return g, pte


def _pte(g: Guest, pte: int) -> int:
    return int.from_bytes(g.vm.read_phys(pte, 8), "little")


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
@pytest.mark.parametrize(("kind", "dirty"), [("read", False), ("rmw", True)])
def test_rmw_load_sets_d_like_a_write_and_stores_nothing(mmu: str, kind: str, dirty: bool) -> None:
    g, pte = _guest(mmu, P | RW | US | A)
    r = g.vcpu.access(0x40_0010, 8, kind, cpl=3)
    assert r.fault is None and r.value == DATA
    assert bool(_pte(g, pte) & D) is dirty
    assert g.vm.read_phys(0x50_0010, 8) == DATA.to_bytes(8, "little")


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_rmw_load_of_a_read_only_page_faults_as_a_write(mmu: str) -> None:
    g, _pte_gpa = _guest(mmu, P | US | A | D)
    assert g.vcpu.access(0x40_0010, 8, "read", cpl=3).value == DATA
    r = g.vcpu.access(0x40_0010, 8, "rmw", cpl=3)
    assert pf(r) == 0x7, "P | W | U: a protection fault of a user write"
