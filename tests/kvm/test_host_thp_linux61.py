"""Transparent huge pages as Linux 6.1 (the lab's L1 kernel) backs a VMM's anonymous memory.

Expected values come from Linux's code and from the real KVM 6.1 the lab recorded
(tests/realdiff/lab/npt-legacy.json, docs/real-kvm.md "the nested lab"):

- mm/huge_memory.c, do_huge_pmd_wp_page (6.1): a write fault on the huge zero page falls back:
  __split_huge_pmd (the MMU notifier over the whole 2 MiB) leaves 4 KiB zero-page PTEs and the
  PTE fault copies only the written page.  Later kernels allocate a huge page instead
  (do_huge_zero_wp_pmd); `Host(huge_zero_wp="thp")`, the default, is that.
- mm/mmap.c (6.1): an anonymous mapping is aligned only to 4 KiB (the 2 MiB alignment for THP was
  reverted before 6.1 and came back in 6.7), so a memslot's host address is not congruent with its
  gfns modulo 2 MiB: kvm_alloc_memslot_metadata disallows 2 MiB sptes, while the host still backs
  every 2 MiB frame wholly inside the mapping with one huge page.  KVM's prefetch
  (get_user_pages_fast_only with FOLL_WRITE) then finds all 512 pages of a frame present once one of
  them was written.  Recorded: mmio64 pages_4k 17 = the 8 page-table pages, the code page alone
  (in the partial first frame), the data page with its 7 neighbours (a huge page).
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.errors import InvalidArgument
from kvmmu.guest.pagetables import RW, US, A, D, GuestPageTables, P, vm_writer

LONG_MODE = dict(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
POOL, POOL_END = 0x10_0000, 0x14_0000
GVA = 0x4000_0000
RWUAD = P | RW | US | A | D


def _vm(mmu: str, anon_offset: int | None) -> tuple:
    host = kvmmu.Host(prealloc=False, huge_zero_wp="split", anon_offset=anon_offset)
    vm = kvmmu.VM(mmu=mmu, host=host, host_hugepage_level=2, tdp_mmu=False if mmu != "shadow" else None)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=POOL, pool_end=POOL_END)
    pt.map_range(POOL, POOL, POOL_END - POOL, P | RW | A | D)
    pt.map(GVA, 0x40_0000, 2 << 20, RWUAD)
    v = vm.create_vcpu()
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    return vm, v


def _faults(v: kvmmu.Vcpu, gva: int, kind: str, value: int | None = None) -> tuple[int, int]:
    t, f = v.stats["pf_taken"], v.stats["pf_fixed"]
    assert v.access(gva, 8, kind, value).fault is None
    return v.stats["pf_taken"] - t, v.stats["pf_fixed"] - f


def _leaf(v: kvmmu.Vcpu, gva: int) -> tuple[int, int]:
    return list(v.mmu.shadow_walk(gva))[-1]


def test_a_write_to_the_huge_zero_page_splits_it_on_linux_61() -> None:
    vm, v = _vm("shadow", None)
    assert _faults(v, GVA + 0x1000, "read") == (1, 1)
    level, spte = _leaf(v, GVA + 0x1000)
    assert level == 2 and not spte & 2                 # the huge zero page, read-only
    # The split's notifier zaps the 2 MiB spte and the fault retries; then one 4 KiB page of its own.
    assert _faults(v, GVA + 0x1000, "write", 5) == (2, 1)
    level, spte = _leaf(v, GVA + 0x1000)
    assert level == 1 and spte & 2 and vm.stats["pages_2m"] == 0
    assert vm.host.cows == 1
    # The rest of the frame is 4 KiB zero pages now: the next write copies one page again (a retry).
    assert _faults(v, GVA + 0x2000, "write", 6) == (2, 1)
    assert _leaf(v, GVA + 0x2000)[0] == 1 and vm.host.cows == 2
    assert v.access(GVA + 0x1000, 8, "read").value == 5
    vm.audit()


def test_the_default_host_replaces_the_huge_zero_page_by_a_huge_page() -> None:
    host = kvmmu.Host(prealloc=False)
    vm = kvmmu.VM(mmu="shadow", host=host, host_hugepage_level=2)
    assert host.huge_zero_wp == "thp" and host.anon_offset is None
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    assert vm.memslots.slot(0, 0).userspace_addr % (2 << 20) == 0


@pytest.mark.parametrize("mmu", ["npt", "shadow"])
def test_an_unaligned_mapping_gets_4k_sptes_and_prefetches_whole_huge_pages(mmu: str) -> None:
    offset = 64 << 12
    vm, v = _vm(mmu, offset)
    slot = vm.memslots.slot(0, 0)
    assert slot.userspace_addr % (2 << 20) == offset
    # gpa 0x400000 lies in a 2 MiB host frame wholly inside the mapping: the VMM's write of one page
    # allocates the huge page; KVM maps 4 KiB (gfn and address are not congruent).
    vm.write_phys(0x40_0000, b"\x11" * 8)
    # (Under NPT the CPU's walk first faults on the guest's table pages, one group of eight.)
    assert _faults(v, GVA, "read") == ((2, 2) if mmu == "npt" else (1, 1))
    level, spte = _leaf(v, GVA if mmu == "shadow" else 0x40_0000)     # NPT's tables are indexed by gpa
    assert level == 1 and spte & 2 and vm.stats["pages_2m"] == 0
    # Every neighbour of the group of eight is present and writable in the huge page: prefetched.
    gfns = {g for (_as, g) in vm.mmu.rmap if 0x400 <= g < 0x408}
    assert gfns == set(range(0x400, 0x408))
    vm.audit()


def test_the_first_partial_frame_of_an_unaligned_mapping_stays_4k() -> None:
    vm, v = _vm("npt", 64 << 12)
    # gpa 0x40000 is in [0, 2 MiB - 256 KiB): host pages of their own; only the written one is present.
    for gpa in (0x40_0000, 0x4_0000):
        vm.write_phys(gpa, b"\x22" * 8)
    assert vm.host.is_present((vm.memslots.slot(0, 0).gfn_to_hva(0x41)) >> 12, True) is False
    assert vm.host.is_present((vm.memslots.slot(0, 0).gfn_to_hva(0x401)) >> 12, True) is True


@pytest.mark.parametrize("kwargs, name", [({"huge_zero_wp": "copy"}, "huge_zero_wp"),
                                          ({"anon_offset": 0x800}, "anon_offset"),
                                          ({"anon_offset": 2 << 20}, "anon_offset"),
                                          ({"anon_offset": "0"}, "anon_offset")])
def test_bad_host_thp_arguments_are_refused(kwargs: dict, name: str) -> None:
    with pytest.raises(InvalidArgument, match=name):
        kvmmu.Host(**kwargs)
