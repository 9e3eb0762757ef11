"""Shadow paging: the first touch of a page, guest permission faults, and the guest's A/D bits.

Spec: docs/spec/kvm-mmu.md §3.2 (kvm_mmu_page_fault), §3.4 (stats after the handler), §3.5 (guest walk,
error codes, A/D updates only after a successful walk), §3.6 (the shadow fault path), §4 (statistics).
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu import GuestFault
from kvmmu.guest.pagetables import NX, RW, US, A, D, GuestPageTables, P, vm_writer
from tests.kvm.harness import DATA, LONG_MODE, PAGE, RWU, SPTE_MMU_PRESENT, Guest, assert_pf

PF = 14


def test_first_touch_maps_the_page(guest: Guest) -> None:
    """§3.6 + §3.4: the first access to a mapped RAM page takes the full handler, which installs a 4 KiB
    leaf spte: pf_taken+1, pf_fixed+1, pages_4k+1; the guest sees the page's contents, no exit."""
    g = guest
    g.pt.map(DATA, DATA)
    g.vm.write_phys(DATA + 8, (0x1122334455667788).to_bytes(8, "little"))
    s = g.snap()
    r = g.vcpu.access(DATA + 8, 8, "read")
    d = s.delta()
    assert (r.fault, r.mmio_exit_records, r.value) == (None, [], 0x1122334455667788)
    assert_pf(d, pf_taken=1, pf_fixed=1, exits=1, mmio_exits=0)
    assert d.vm["pages_4k"] == 1
    g.audit()


def test_first_touch_shadows_only_the_new_guest_table(guest: Guest) -> None:
    """§3.6 FNAME(fetch) + §2.2: a child shadow page per guest table on the path is found or created;
    only the level-1 table not yet shadowed is a hash miss (mmu_cache_miss+1)."""
    g = guest
    g.pt.map(DATA, DATA)                # same PML4E/PDPTE/PD as the WARM page, a new page table
    s = g.snap()
    g.vcpu.access(DATA, 8, "read")
    assert s.delta().vm["mmu_cache_miss"] == 1
    g.audit()


def test_second_access_does_not_fault(guest: Guest) -> None:
    """§3.6: once the spte is installed the CPU translates through it; KVM is not involved."""
    g = guest
    g.pt.map(DATA, DATA)
    g.vcpu.access(DATA, 8, "read")
    s = g.snap()
    r = g.vcpu.access(DATA + 0x10, 4, "read")
    d = s.delta()
    assert r.fault is None and r.mmio_exit_records == []
    assert_pf(d, exits=0)
    assert d.vm["pages_4k"] == 0
    g.audit()


def test_successful_read_walk_sets_accessed_not_dirty(guest: Guest) -> None:
    """§3.5.1 step 9: after a successful walk KVM sets A at every level; D only at the leaf and only
    on a write."""
    g = guest
    g.pt.map(DATA, DATA)
    g.vcpu.access(DATA, 4, "read")
    for level in (4, 3, 2, 1):
        assert g.gpte(DATA, level) & A, f"A not set at level {level}"
    assert not g.gpte(DATA, 1) & D
    g.audit()


def test_first_write_sets_dirty_and_reaches_memory(guest: Guest) -> None:
    """§3.5.1 steps 8-9: a write walk sets D in the leaf gpte; the store lands in guest RAM."""
    g = guest
    g.pt.map(DATA, DATA)
    s = g.snap()
    r = g.vcpu.access(DATA + 4, 4, "write", 0xCAFEF00D)
    assert r.fault is None and r.mmio_exit_records == []
    assert_pf(s.delta(), pf_taken=1, pf_fixed=1)
    assert g.gpte(DATA, 1) & (A | D) == A | D
    assert g.vm.read_phys(DATA + 4, 4) == (0xCAFEF00D).to_bytes(4, "little")
    g.audit()


def test_write_after_read_on_clean_page_faults_once_more_to_set_dirty(guest: Guest) -> None:
    """§3.5.1 step 8 (protect_clean_gpte): a read of a clean page maps it without write permission,
    so the first write traps (pf_taken+1, pf_fixed+1) and sets D."""
    g = guest
    g.pt.map(DATA, DATA)
    g.vcpu.access(DATA, 4, "read")
    assert not g.gpte(DATA, 1) & D
    s = g.snap()
    r = g.vcpu.access(DATA, 4, "write", 1)
    assert r.fault is None
    assert_pf(s.delta(), pf_taken=1, pf_fixed=1)
    assert g.gpte(DATA, 1) & D
    g.audit()


# -- guest permission faults -----------------------------------------------------------------------
# (gpte flags of the leaf, access kind, CPL, expected #PF error code per the SDM / §3.5.1 "fault return")
PERMISSION_CASES = {
    "user read of a supervisor page": (P | RW, "read", 3, 0x5),
    "user write to a read-only user page": (P | US, "write", 3, 0x7),
    "supervisor write to a read-only page, CR0.WP=1": (P | US, "write", 0, 0x3),
    "supervisor read of a not-present page": (0, "read", 0, 0x0),
    "user write to a not-present page": (0, "write", 3, 0x6),
    "fetch from an NX page with EFER.NX": (P | RW | US | NX, "fetch", 0, 0x11),
    "reserved bit 51 in the leaf (guest MAXPHYADDR 46)": (P | RW | US | (1 << 51), "read", 0, 0x9),
}


@pytest.mark.parametrize("flags,kind,cpl,error_code", PERMISSION_CASES.values(), ids=PERMISSION_CASES.keys())
def test_guest_fault_is_injected_with_sdm_error_code(guest: Guest, flags: int, kind: str, cpl: int,
                                                     error_code: int) -> None:
    """§3.6 step 1: a failing guest walk injects #PF into the guest (pf_taken+1, pf_guest+1) with the
    error code of §3.5.1 (P for a protection fault, W/U from the access, F for a fetch with EFER.NX,
    RSVD|P for a reserved bit) and CR2 = the faulting address; no spte is installed."""
    g = guest
    gva = DATA + 3 * PAGE
    g.pt.map(gva, DATA, flags=flags)
    s = g.snap()
    r = g.vcpu.access(gva + 0x20, 4, kind, 0 if kind == "write" else None, cpl=cpl)
    d = s.delta()
    assert r.fault == GuestFault(PF, error_code, gva + 0x20)
    assert r.mmio_exit_records == []
    assert_pf(d, pf_taken=1, pf_guest=1, mmio_exits=0)
    assert d.vm["pages_4k"] == 0
    level, spte = g.leaf_spte(gva)
    assert not (level == 1 and spte & SPTE_MMU_PRESENT), "a faulting walk must not install a leaf spte"
    g.audit()


def test_faulting_walk_sets_no_accessed_bit(guest: Guest) -> None:
    """docs/spec/kvm-pvm-host.md §2 (measured on real KVM) + §3.5.1 step 9: KVM's walker sets A only after a successful
    walk, so a walk ending in a fault leaves the new PDE and the leaf gpte without A."""
    g = guest
    g.pt.map(DATA, DATA, flags=P | RW)        # supervisor-only page
    r = g.vcpu.access(DATA, 4, "read", cpl=3)
    assert r.fault is not None
    assert not g.gpte(DATA, 2) & A
    assert not g.gpte(DATA, 1) & A
    g.audit()


def test_guest_fault_does_not_consume_the_retry(guest: Guest) -> None:
    """§3.6: after the guest fixes its PTE, the same access succeeds through the normal full path."""
    g = guest
    g.pt.map(DATA, DATA, flags=P | RW)
    assert g.vcpu.access(DATA, 4, "read", cpl=3).fault is not None
    g.pt.map(DATA, DATA, flags=RWU)           # the guest's #PF handler grants U (no spte existed)
    s = g.snap()
    r = g.vcpu.access(DATA, 4, "read", cpl=3)
    assert r.fault is None
    assert_pf(s.delta(), pf_taken=1, pf_fixed=1)
    g.audit()


# -- the shadow-page quota (§2.1 KVM_MIN_FREE_MMU_PAGES / KVM_REFILL_PAGES, §4 mmu_recycled) ------------------
def test_small_quota_recycles_oldest_pages_and_stays_correct() -> None:
    """§2.1 / §4: when fewer than KVM_MIN_FREE_MMU_PAGES shadow pages are available the oldest are zapped
    (mmu_recycled); every access still translates to the right memory and the audit stays clean."""
    vm = kvmmu.VM(mmu="shadow", mmio_caching="generation", max_mmu_pages=64)        # KVM_MIN_ALLOC_MMU_PAGES
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=256 << 20)
    w, r = vm_writer(vm)
    pt = GuestPageTables("4level", w, r, pool=0x10_0000, pool_end=0x20_0000)
    regions = 100                                    # one guest page table each: more than the quota
    for i in range(regions):
        pt.map(i << 21, 0x40_0000 + (i % 16) * PAGE)
    for i in range(16):
        vm.write_phys(0x40_0000 + i * PAGE, i.to_bytes(8, "little"))
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr3=pt.cr3, **LONG_MODE)
    for i in range(regions):
        res = vcpu.access(i << 21, 8, "read")
        assert (res.fault, res.value) == (None, i % 16)
    assert vm.stats["mmu_recycled"] > 0
    assert vm.stats["mmu_shadow_zapped"] >= vm.stats["mmu_recycled"]
    vm.audit()
