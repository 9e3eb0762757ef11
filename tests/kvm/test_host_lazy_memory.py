"""Lazily allocated guest RAM (`Host(prealloc=False)`) and what KVM's fault and prefetch paths make
of it.  Expected values come from KVM's code and this host's measurements:

- virt/kvm/kvm_main.c, hva_to_pfn: the fast path takes only a host page mapped writable; a read fault
  that needs the slow path gets what get_user_pages finds for a read (the zero page, for anonymous
  memory never written) and maps it writable only if a FOLL_WRITE fast lookup then succeeds
  (kvm_resolve_pfn sets map_writable), so the spte of a zero page is read-only;
- the write fault on it copies the zero page; the host's MMU notifier (kvm_mmu_notifier_invalidate_
  range_start -> kvm_unmap_gfn_range) drops the sptes, and the fault sees mmu_invalidate_seq moved
  (is_page_fault_stale): RET_PF_RETRY, no pf_fixed; the retried access faults once more and maps it.
  Measured: corpus programs host_zero_page_cpl3 and demand_read_first_cpl3 (docs/real-kvm.md);
- a write to a page nothing mapped yet allocates it without invalidating anything: no retry;
- arch/x86/kvm/mmu/mmu.c, __direct_pte_prefetch / direct_pte_prefetch_many and
  kvm_main.c, kvm_prefetch_pages: the unmapped neighbours of a direct 4 KiB spte, in runs within the
  aligned group of 8, are taken with get_user_pages_fast_only(FOLL_WRITE), which stops at the first
  page that is not present and writable; a run whose first page fails ends the whole prefetch, and a
  read-only slot never prefetches (gfn_to_hva_many asks for a writable address);
  measured: large_page_prefetch_cpl3;
- paging_tmpl.h, FNAME(prefetch_gpte): the same lookup for one gpte; FNAME(pte_prefetch) stops at the
  first gpte that fails.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.errors import InvalidArgument
from kvmmu.guest.pagetables import RW, US, A, D, GuestPageTables, P, vm_writer
from kvmmu.kvm.mmu.spte import SPTE_MMU_PRESENT_MASK

LONG_MODE = dict(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
POOL, POOL_END = 0x10_0000, 0x14_0000
GVA, PAGE = 0x4000_0000, 0x40_0000
RWUAD = P | RW | US | A | D


def setup(prealloc: bool, readonly_at: int | None = None) -> tuple:
    vm = kvmmu.VM(mmu="shadow", host=kvmmu.Host(prealloc=prealloc))
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    if readonly_at is not None:
        vm.set_user_memory_region(slot=1, guest_phys_addr=readonly_at, memory_size=2 << 20, flags=2)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=POOL, pool_end=POOL_END)
    pt.map_range(POOL, POOL, POOL_END - POOL, P | RW | A | D)
    v = vm.create_vcpu()
    return vm, pt, v


def leaf(v: kvmmu.Vcpu, gva: int) -> tuple[int, int]:
    return list(v.mmu.shadow_walk(gva))[-1]


def faults(v: kvmmu.Vcpu, *accesses: tuple) -> tuple[int, int]:
    t, f = v.stats["pf_taken"], v.stats["pf_fixed"]
    for gva, kind, value in accesses:
        assert v.access(gva, 8, kind, value).fault is None
    return v.stats["pf_taken"] - t, v.stats["pf_fixed"] - f


@pytest.mark.parametrize("prealloc", [True, False])
def test_read_then_write_of_a_never_written_page(prealloc: bool) -> None:
    vm, pt, v = setup(prealloc)
    pt.map(GVA, PAGE, flags=RWUAD)
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert faults(v, (GVA, "read", None)) == (1, 1)
    level, spte = leaf(v, GVA)
    assert level == 1 and spte & SPTE_MMU_PRESENT_MASK
    assert bool(spte & 2) is prealloc, "the zero page is mapped read-only"
    flushes = vm.stats["remote_tlb_flush"]
    got = faults(v, (GVA, "write", 7))
    if prealloc:
        assert got == (0, 0)
    else:
        assert got == (2, 1), "the copy-on-write retries the fault once"
        assert vm.host.cows == 1 and vm.stats["remote_tlb_flush"] > flushes
    assert vm.read_phys(PAGE, 1) == b"\x07"
    vm.audit()


def test_write_to_a_never_touched_page_does_not_retry() -> None:
    vm, pt, v = setup(False)
    pt.map(GVA, PAGE, flags=RWUAD)
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert faults(v, (GVA, "write", 1)) == (1, 1)
    assert vm.host.cows == 0 and leaf(v, GVA)[1] & 2
    vm.audit()


def test_vmm_write_to_a_zero_mapped_page_drops_its_spte() -> None:
    vm, pt, v = setup(False)
    pt.map(GVA, PAGE, flags=RWUAD)
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert v.access(GVA, 8, "read").value == 0
    vm.write_phys(PAGE, (0x99).to_bytes(8, "little"))
    assert not leaf(v, GVA)[1] & SPTE_MMU_PRESENT_MASK, "the COW ran the MMU notifier"
    assert v.access(GVA, 8, "read").value == 0x99
    vm.audit()


def _big_page(vm: kvmmu.VM, pt: GuestPageTables, v: kvmmu.Vcpu, gpa: int = 0x20_0000) -> None:
    pt.map(GVA, gpa, 2 << 20, RWUAD)
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)


def _mapped(v: kvmmu.Vcpu, base: int, n: int = 8) -> list[int]:
    return [i for i in range(n) if leaf(v, base + 0x1000 * i)[0] == 1
            and leaf(v, base + 0x1000 * i)[1] & SPTE_MMU_PRESENT_MASK]


@pytest.mark.parametrize("written,mapped", [
    ((0, 1, 2, 4, 5, 6, 7), [0, 1, 2, 5, 6, 7]),       # run 0..4 stops at 3; run 6..7 taken
    ((1, 2, 5, 6, 7), [5]),                            # run 0..4 fails at once: no prefetch at all
    ((0, 1, 2, 3, 4, 5, 6, 7), [0, 1, 2, 3, 4, 5, 6, 7]),
], ids=["hole", "first-missing", "all-present"])
def test_direct_prefetch_takes_present_host_pages_in_runs(written: tuple, mapped: list) -> None:
    vm, pt, v = setup(False)
    for i in written:
        vm.write_phys(0x20_0000 + 0x1000 * i, b"\x01")
    _big_page(vm, pt, v)
    assert v.access(GVA + 0x5000, 8, "read").fault is None
    assert _mapped(v, GVA) == mapped
    vm.audit()


def test_direct_prefetch_skips_a_read_only_slot() -> None:
    vm, pt, v = setup(True, readonly_at=0x200_0000)
    _big_page(vm, pt, v, 0x200_0000)
    assert v.access(GVA + 0x5000, 8, "read").fault is None
    assert _mapped(v, GVA) == [5]
    vm.audit()


def test_shadow_prefetch_stops_at_a_gpte_whose_host_page_is_absent() -> None:
    vm, pt, v = setup(False)
    for i in range(8):
        pt.map(GVA + 0x1000 * i, PAGE + 0x1000 * i, flags=RWUAD)
    for i in (0, 1, 2, 4, 6, 7):
        vm.write_phys(PAGE + 0x1000 * i, b"\x01")
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert v.access(GVA + 0x1000, 8, "read").fault is None
    # FNAME(pte_prefetch) walks the group in order, skipping the faulting gpte; gpte 3 fails.
    assert _mapped(v, GVA) == [0, 1, 2]
    vm.audit()


def test_host_prealloc_must_be_a_bool() -> None:
    with pytest.raises(InvalidArgument, match="prealloc"):
        kvmmu.Host(prealloc=0)  # type: ignore[arg-type]


def test_huge_zero_page_is_mapped_read_only_then_replaced_by_a_huge_page() -> None:
    """Transparent huge pages (host_hugepage_level=2): a read fault maps the host's huge zero page
    (a read-only 2 MiB spte); the write allocates a huge page in its place (Linux 6.18 replaces the
    huge zero page on a write fault), the notifier zaps and the fault retries, then one writable 2 MiB
    spte.  Measured: corpus program huge_page_zero_cpl3 (pf_taken 5, pf_fixed 4, pages_2m 1)."""
    vm = kvmmu.VM(mmu="shadow", host=kvmmu.Host(prealloc=False), host_hugepage_level=2)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=POOL, pool_end=POOL_END)
    pt.map_range(POOL, POOL, POOL_END - POOL, P | RW | A | D)
    pt.map(GVA, 0x20_0000, 2 << 20, RWUAD)
    v = vm.create_vcpu()
    v.set_sregs(cr3=pt.cr3, **LONG_MODE)
    assert faults(v, (GVA + 0x1000, "read", None)) == (1, 1)
    level, spte = leaf(v, GVA)
    assert level == 2 and not spte & 2
    assert faults(v, (GVA + 0x1FF000, "write", 2)) == (2, 1)
    level, spte = leaf(v, GVA)
    assert level == 2 and spte & 2 and vm.stats["pages_2m"] == 1
    vm.audit()
