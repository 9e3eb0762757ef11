"""A guest makes progress on a host short of memory, under every MMU flavour (bug 9).

Under EPT/NPT the CPU's 2-D walk needs the guest's table pages and the data page mapped at the same
time; host reclaim must not take one of them while KVM faults in the next (Host.pin_walk), or the
access livelocks.  Expected values come from what the VMM wrote and from counting pages: a host
with F free pages cannot keep more than max(F, one access's pages) guest pages resident, so a
guest cycling through more distinct pages than that must swap some of them back in.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_LA57, X86_CR4_PAE
from kvmmu.guest.pagetables import RW, GuestPageTables, P, vm_writer

FLAVOURS = ("shadow", "ept", "npt")
MODES = {
    "4level": dict(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX),
    "5level": dict(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr4=X86_CR4_PAE | X86_CR4_LA57, efer=EFER_LME | EFER_NX),
}
LEVELS = {"4level": 4, "5level": 5}
POOL = 0x10_0000                  # guest page tables are taken from here, one page at a time
LIMIT = 4 << 20


def small_host(free_pages: int) -> kvmmu.Host:
    """A host with room for `free_pages` 4 KiB pages of guest RAM and KVM tables together."""
    return kvmmu.Host(memory_limit=LIMIT, reserved=LIMIT - (free_pages << 12))


def value_at(gpa: int, generation: int = 0) -> int:
    """What the test stores at `gpa` (distinct for every page and generation, so a stale page shows)."""
    return (0xC0DE << 48) | (generation << 40) | gpa


class Guest:
    """One vCPU, RAM [0, ram) in slot 0, and guest tables in `mode` mapping gva == gpa."""

    def __init__(self, host: kvmmu.Host, flavour: str, mode: str = "4level", ram: int = 16 << 20) -> None:
        self.host = host
        self.vm = kvmmu.VM(mmu=flavour, host=host)
        self.vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=ram)
        self.pt = GuestPageTables(mode, *vm_writer(self.vm), pool=POOL)
        self.vcpu = self.vm.create_vcpu()
        self.mode = mode

    def start(self) -> None:
        self.vcpu.set_sregs(cr3=self.pt.cr3, **MODES[self.mode])

    def hva(self, gpa: int) -> int:
        gfn = gpa >> 12
        return self.vm.memslots.spaces[0].search(gfn).gfn_to_hva(gfn)

    def resident(self, gpa: int) -> bool:
        return self.host.is_resident(self.hva(gpa) >> 12)


def data_pages(n: int) -> list[int]:
    """`n` data pages, half in the 2 MiB region at 4 MiB and half at 8 MiB (two guest page tables, two
    TDP page tables), clear of the page-table pool."""
    return [(0x40_0000 if i % 2 == 0 else 0x80_0000) + (i // 2) * 0x1000 for i in range(n)]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_one_access_completes_on_a_host_with_eight_free_pages(flavour: str, mode: str) -> None:
    """The reproducer of bug 9, in 4- and 5-level paging: the read returns what the VMM wrote.  The
    access needs LEVELS+1 guest pages (tables and data) and KVM's own table pages; eight free host
    pages do not hold both, so the host lends the access its working set from the rest of its memory."""
    g = Guest(small_host(8), flavour, mode)
    g.pt.map(0x40_0000, 0x40_0000, flags=P | RW)
    g.vm.write_phys(0x40_0000, value_at(0x40_0000).to_bytes(8, "little"))
    g.start()
    assert g.vcpu.access(0x40_0000, 8, "read").value == value_at(0x40_0000)
    assert g.resident(0x40_0000), "the page just read is the last one faulted in: never the victim"
    if flavour != "shadow":
        # The walk that just completed went through every guest table page with the data page mapped.
        tables = g.pt.tables
        assert len(tables) == LEVELS[mode]
        assert all(g.resident(t) for t in tables)
    g.vm.audit()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tdp_walk_pages_are_borrowed_not_evicted_when_nothing_else_is_left(flavour: str) -> None:
    """Eight free pages cannot hold 4 guest tables + 1 data page + KVM's 5 TDP table pages (root,
    PDPT, PD, and one page table each for the table pool's and the data's 2 MiB regions): under
    EPT/NPT the host stops short of its limit (reclaims_short) rather than zap a page the walk needs,
    and what it lends is only the access's own 5 pages.  Shadow paging needs only the data page
    mapped once KVM has walked the guest tables, so it never has to stop short."""
    g = Guest(small_host(8), flavour)
    g.pt.map(0x40_0000, 0x40_0000, flags=P | RW)
    g.start()
    assert g.vcpu.access(0x40_0000, 8, "write", 7).value is None
    assert g.vm.read_phys(0x40_0000, 8) == (7).to_bytes(8, "little")
    if flavour == "shadow":
        assert g.host.reclaims_short == 0
    else:
        assert g.host.kernel_pages_in_use == 5
        assert g.host.reclaims_short > 0
        assert len(g.host.resident) == 4 + 1
        assert g.host.swapouts == 0                # nothing else was resident: nothing was evicted


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_guest_cycles_through_more_pages_than_the_host_has(flavour: str, mode: str) -> None:
    """32 data pages on a host with 8 free pages, three passes (read, write, read): every value is
    what was last written, by the VMM or the guest.  After any reclaim at most max(8, one access's
    LEVELS+1 pages) guest pages are resident, so pass 2 must swap the rest of the 32 back in, and
    the host and the vCPU both count those swap-ins."""
    g = Guest(small_host(8), flavour, mode)
    pages = data_pages(32)
    for gpa in pages:
        g.pt.map(gpa, gpa, flags=P | RW)
        g.vm.write_phys(gpa, value_at(gpa).to_bytes(8, "little"))
    g.start()
    for gpa in pages:                                             # pass 1: what the VMM wrote
        assert g.vcpu.access(gpa, 8, "read").value == value_at(gpa)
    resident_cap = max(8, LEVELS[mode] + 1)
    assert len(g.host.resident) <= resident_cap
    host_swapins, vcpu_swapins, swapouts = g.host.swapins, g.vcpu.counters["host_swapins"], g.host.swapouts
    assert swapouts >= len(pages) - resident_cap                # they all went through memory once
    for gpa in pages:                                             # pass 2: the guest overwrites
        assert g.vcpu.access(gpa, 8, "write", value_at(gpa, 1)).value is None
    # Every data page not resident at the start of pass 2 was swapped out in pass 1 (all were touched
    # then), and the write faults it back in: at least 32 - resident_cap swap-ins.
    assert g.host.swapins - host_swapins >= len(pages) - resident_cap
    assert g.vcpu.counters["host_swapins"] - vcpu_swapins == g.host.swapins - host_swapins
    assert g.host.swapouts > swapouts
    for gpa in pages:                                             # pass 3: the guest's own writes
        assert g.vcpu.access(gpa, 8, "read").value == value_at(gpa, 1)
        assert g.vm.read_phys(gpa, 8) == value_at(gpa, 1).to_bytes(8, "little")
    g.vm.audit()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_host_stays_under_its_limit_when_one_access_fits(flavour: str) -> None:
    """With 24 free pages, one access's 5 guest pages plus KVM's tables for two data regions (well
    under 19 pages) fit, so reclaim always gets back under the limit: nothing is ever borrowed, and
    yet 32 distinct data pages force swapping."""
    g = Guest(small_host(24), flavour)
    pages = data_pages(32)
    for gpa in pages:
        g.pt.map(gpa, gpa, flags=P | RW)
        g.vm.write_phys(gpa, value_at(gpa).to_bytes(8, "little"))
    g.start()
    for _ in range(2):
        for gpa in pages:
            assert g.vcpu.access(gpa, 8, "read").value == value_at(gpa)
            assert g.host.over_limit() == 0
    assert g.host.reclaims_short == 0
    assert g.host.swapins > 0 and g.host.swapouts > 0
    for (as_id, gfn) in list(g.vm.mmu.rmap):                   # no spte maps a swapped-out page
        assert g.host.is_resident(g.vm.memslots.spaces[as_id].search(gfn).gfn_to_hva(gfn) >> 12)
    g.vm.audit()


def test_reclaim_takes_the_oldest_pages_not_in_use() -> None:
    """The LRU order without VMs (so no accessed bits, no second chances): with room for 4 pages and
    6 touched, the two oldest pages that are neither pinned by the walk nor being faulted in go."""
    host = small_host(4)
    for pfn in range(1, 7):
        host.touch(pfn)
    host.pin_walk([1, 2])
    assert host.reclaim(keep=6) == 2
    assert list(host.resident) == [1, 2, 5, 6]
    assert host.swapped == {3, 4}
    host.unpin_walk()
    host.touch(7)
    assert host.reclaim(keep=7) == 1
    assert list(host.resident) == [2, 5, 6, 7]                 # unpinned, page 1 is the oldest again


def test_host_out_of_memory_when_the_pages_in_use_exceed_all_its_memory() -> None:
    """If KVM's pages plus the pages one access needs exceed the host's whole memory_limit, there is
    nothing left to reclaim or borrow: a typed error naming the limit (Linux would OOM-kill the VMM),
    not a livelock or a KvmBug."""
    host = kvmmu.Host(memory_limit=1 << 20, reserved=(1 << 20) - (4 << 12))     # 256 pages in all
    for pfn in range(1, 301):
        host.touch(pfn)
    host.pin_walk(list(range(1, 300)))
    with pytest.raises(kvmmu.HostOutOfMemory, match="memory_limit") as exc:
        host.reclaim(keep=300)
    assert exc.value.value == 1 << 20
    assert isinstance(exc.value, kvmmu.InvalidArgument)


def test_ept_guest_spreading_over_more_regions_than_the_host_has_pages_runs_out_of_memory() -> None:
    """End to end: each 2 MiB region a guest touches costs KVM one TDP page table, which the host can
    never reclaim.  A guest with 2 MiB pages touching a new region per access on a 256-page host must
    run out; every access before that reads what the VMM wrote, and the error comes when KVM's pages
    plus the access's pages exceed 256, as a HostOutOfMemory, not a KvmBug."""
    host = kvmmu.Host(memory_limit=1 << 20, reserved=(1 << 20) - (8 << 12))
    g = Guest(host, "ept", ram=1 << 30)
    regions = [k << 21 for k in range(1, 300)]
    for gpa in regions:
        g.pt.map(gpa, gpa, page_size=2 << 20, flags=P | RW)
        g.vm.write_phys(gpa, value_at(gpa).to_bytes(8, "little"))
    g.start()
    done = 0
    with pytest.raises(kvmmu.HostOutOfMemory, match="memory_limit"):
        for gpa in regions:
            assert g.vcpu.access(gpa, 8, "read").value == value_at(gpa)
            done += 1
    # When region i is faulted in, KVM holds 4 TDP pages (root, PDPT, PD, the pool region's page
    # table) plus one page table for each of the i regions before it, and the access needs the 3
    # guest tables (PML4, PDPT, PD: 2 MiB pages) and the data page: 4 + i + 4 > 256 first at i = 249.
    assert done == 249
    assert host.kernel_pages_in_use == 4 + 249
    assert len(host.resident) == 3 + 1
