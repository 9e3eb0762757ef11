"""KVM's one walk of its own tables (kvm/mmu/shadow_iter.py) on PAE and 4-level shadow roots.

Spec: §2.3 (a PAE or 32-bit guest runs on a PAE root: four PDPTEs, each naming a level-2 shadow
page), §3.3 (the lockless walk starts at pae_root for a PAE root).  Entry positions follow the SDM's
address layout (Vol. 3A 4.4.1, 4.5): the PDPTE by bits 31:30, then 9 bits per level from bit 12.
"""

from __future__ import annotations

from kvmmu.arch.bits import PT64_ADDR_MASK
from kvmmu.kvm.mmu.shadow_iter import ShadowWalk, for_each_shadow_entry, for_each_shadow_entry_lockless
from tests.kvm.harness import DATA
from tests.kvm.test_paging_modes import ModeGuest


def _walk(g: ModeGuest, addr: int) -> list[tuple[int, int]]:
    return [(it.level, it.sptep) for it in for_each_shadow_entry(g.vcpu.mmu, addr)]


def test_pae_root_walk_starts_below_the_pdpte() -> None:
    g = ModeGuest("pae")
    assert g.vcpu.access(DATA, 4, "read").fault is None
    mmu, mem = g.vcpu.mmu, g.vm.host.mem
    pdpte = mem.read(mmu.pae_root + 8 * 0, 8)                  # DATA = 0x400000: PDPT entry 0
    pd = pdpte & PT64_ADDR_MASK
    walked = _walk(g, DATA)
    assert [lv for lv, _ in walked] == [2, 1]
    assert walked[0][1] == pd + 8 * 2                          # bits 29:21 of 0x400000
    pt = mem.read(walked[0][1], 8) & PT64_ADDR_MASK
    assert walked[1][1] == pt + 8 * 0
    assert [(it.level, spte) for it, spte in for_each_shadow_entry_lockless(mmu, DATA)] == \
        [(2, mem.read(pd + 16, 8)), (1, mem.read(pt, 8))]


def test_pae_walk_of_a_not_present_pdpte_reads_nothing_below() -> None:
    g = ModeGuest("pae")
    mmu = g.vcpu.mmu
    assert g.vm.host.mem.read(mmu.pae_root + 8 * 3, 8) == 0    # the guest maps nothing above 3 GiB
    assert _walk(g, 0xC000_0000) == []
    assert not ShadowWalk(mmu, 0xC000_0000).okay()


def test_4level_walk_indexes_each_table_by_its_address_bits() -> None:
    g = ModeGuest("4level")
    assert g.vcpu.access(DATA, 4, "read").fault is None
    mmu, mem = g.vcpu.mmu, g.vm.host.mem
    walked = _walk(g, DATA)
    assert [lv for lv, _ in walked] == [4, 3, 2, 1]
    assert walked[0][1] == mmu.root_hpa                        # PML4 and PDPT index 0 for 0x400000
    table = mem.read(walked[0][1], 8) & PT64_ADDR_MASK
    assert walked[1][1] == table
    table = mem.read(walked[1][1], 8) & PT64_ADDR_MASK
    assert walked[2][1] == table + 8 * 2


def test_walk_without_a_root_is_empty() -> None:
    g = ModeGuest("4level")
    mmu = g.vcpu.mmu
    assert _walk(g, DATA) != []
    assert list(for_each_shadow_entry(mmu, DATA, root_hpa=0)) == []
