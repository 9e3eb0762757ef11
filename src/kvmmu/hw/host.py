"""The modelled host machine: its physical memory, MAXPHYADDR, and who owns which frames.

Host virtual and physical addresses coincide (one flat host), so a VMM's guest-RAM mapping at hva
H is host frame H >> 12.  Each VMM process gets its own region; KVM's shadow tables come from a
kernel region.  Nothing is allocated until written (SparseMemory).

Host memory pressure (`Host(memory_limit=...)`): the host then tracks which guest-RAM pages are
resident.  A page becomes resident when KVM first touches it (`VM.host_touch`: a fault-in, a read of
a guest PTE, an emulated RAM access); when the resident guest pages plus KVM's own (unswappable)
kernel pages plus `reserved` bytes exceed the limit, the host reclaims the least recently touched
guest pages, giving a second chance to pages whose sptes KVM reports young (accessed bit set, as
`kvm_age_gfn` does), and swaps them out.  A swapped-out page keeps its contents (the model's swap
is bookkeeping); touching it again is a swap-in.  Without a limit nothing is tracked and every page
counts as resident, as before.

Lazy anonymous memory (`Host(prealloc=False)`, what a VMM gets without QEMU's -mem-prealloc): a
guest-RAM page has no host page until something writes it (the VMM through its mapping, KVM through
the user address, a write fault).  A read of a page never written maps the host's shared zero page,
read-only; the first write then copies it (COW), and the host's MMU notifier drops every spte that
maps the page.  So KVM's read fault on such a page maps it read-only (`map_writable` false, the
slow path of hva_to_pfn), its write fault on a zero-mapped page is retried (the notifier ran during
it: is_page_fault_stale), and KVM's prefetch, which only takes pages that are present and writable
(get_user_pages_fast_only with FOLL_WRITE), skips both kinds.  The model's frame of a zero-mapped page
is the page's own (all zero until written, and any write COWs it first), not one shared frame.
On transparent huge pages (`VM(host_hugepage_level=2)`) a fault covers the whole 2 MiB frame: a read
maps the huge zero page, a write allocates a huge page.  A write to the huge zero page depends on the
kernel (`huge_zero_wp`): "thp", recent Linux (do_huge_zero_wp_pmd), allocates a huge page in its place;
"split", Linux 6.1 (do_huge_pmd_wp_page falls back), splits the PMD into 4 KiB zero-page PTEs, which
runs the MMU notifier over the whole 2 MiB, and copies only the written page: the frame stays 4 KiB
pages for good (no khugepaged here).  Where a mapping starts (`anon_offset`): None, recent Linux, puts
an anonymous mapping of at least 2 MiB on a 2 MiB boundary (thp_get_unmapped_area); an int, Linux 6.1,
aligns it only to 4 KiB, and the model starts it that many bytes past a 2 MiB boundary (what ASLR gave
the VMM), so only the 2 MiB frames wholly inside the mapping can be huge pages, and they are not
congruent with the guest frames (KVM then maps 4 KiB sptes).  With `prealloc=True` (the default)
every page is populated from the start, as before.

Reclaim never takes a page the guest's current access is using (`reclaim`, `pin_walk`): the page
being faulted in, and under EPT/NPT the guest's table pages the CPU's 2-D walk has already gone
through.  When only such pages are left, the host goes over `memory_limit - reserved` by those few
pages (they come out of `reserved`, the rest of the host) rather than livelock; if even all of
`memory_limit` cannot hold them plus KVM's own pages, reclaim raises HostOutOfMemory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from ..arch.index import hpa_to_pfn, pfn_to_hpa
from ..errors import HostOutOfMemory, InvalidArgument
from .memory import SparseMemory

_VMM_BASE = 1 << 32          # first VMM process region
_DMA32_BASE = 0x80000000     # ... except pages that a 32-bit CR3 must reach (PAE roots)


class MmuNotifier(Protocol):
    """What the host's memory management calls when a page of a mapping changes (Linux's
    mmu_notifier_ops; KVM registers one per VM, kvm_init_mmu_notifier).  [start, end) are host
    virtual addresses, here always one 4 KiB page."""

    def invalidate_range(self, start: int, end: int) -> bool:
        """The range is about to be unmapped: drop every translation of it; True if any was dropped."""
        ...

    def clear_young(self, start: int, end: int) -> bool:
        """True if the range was accessed since the last call (the accessed bits are cleared)."""
        ...


class Host:
    """A host with `maxphyaddr` physical address bits (46 by default, as on the machines here)."""

    def __init__(self, maxphyaddr: int = 46, memory_limit: int | None = None, reserved: int = 0,
                 cores: int = 4, prealloc: bool = True, huge_zero_wp: str = "thp",
                 anon_offset: int | None = None) -> None:
        if type(maxphyaddr) is not int or not 36 <= maxphyaddr <= 52:
            raise InvalidArgument("host maxphyaddr", maxphyaddr, "the host's MAXPHYADDR is between 36 and 52")
        if memory_limit is not None and (type(memory_limit) is not int or memory_limit < 1 << 20):
            raise InvalidArgument("host memory_limit", memory_limit, "a host memory limit is at least 1 MiB")
        if type(reserved) is not int or reserved < 0 or (memory_limit is not None and reserved >= memory_limit):
            raise InvalidArgument("host reserved", reserved,
                                  "memory reserved for the host itself is >= 0 and below the memory limit")
        if type(cores) is not int or cores < 1:
            raise InvalidArgument("host cores", cores, "a host has at least one CPU core")
        if type(prealloc) is not bool:
            raise InvalidArgument("host prealloc", prealloc, "prealloc is True (guest RAM populated up front) "
                                  "or False (allocated on first touch, the zero page for reads)")
        if huge_zero_wp not in ("thp", "split"):
            raise InvalidArgument("host huge_zero_wp", huge_zero_wp, "a write to the huge zero page allocates a huge "
                                  "page (\"thp\") or splits it into 4 KiB zero pages (\"split\", Linux 6.1)")
        if anon_offset is not None and (type(anon_offset) is not int or not 0 <= anon_offset < 1 << 21
                                        or anon_offset & 0xFFF):
            raise InvalidArgument("host anon_offset", anon_offset, "None (mappings on 2 MiB boundaries) or a "
                                  "multiple of 4 KiB below 2 MiB (where a mapping starts within a 2 MiB frame)")
        self.prealloc = prealloc
        self.huge_zero_wp = huge_zero_wp
        self.anon_offset = anon_offset
        # Lazy anonymous memory (prealloc=False): pages with a private host page, and pages whose host
        # mapping is the shared zero page (read, never written).
        self.populated: set[int] = set()
        self.zero_mapped: set[int] = set()
        self.cows = 0
        self.reserved = reserved
        self.cores = cores
        # Host memory pressure: resident guest pages in LRU order (oldest first) and swapped-out pages.
        self.resident: OrderedDict[int, None] = OrderedDict()
        self.swapped: set[int] = set()
        # Huge frames (pfn >> 9 for 2 MiB, pfn >> 18 for 1 GiB) that lost a page to swap: Linux splits
        # a huge page to swap part of it, and nothing here puts it back together (no khugepaged).
        self.split_frames: set[tuple[int, int]] = set()
        self.swapins = 0
        self.swapouts = 0
        self.second_chances = 0
        # The host pages of the 2-D walk in flight (see pin_walk), and how often reclaim had to stop
        # short of the limit because every page left was in use by the current access.
        self.walk_pins: frozenset[int] = frozenset()
        self.reclaims_short = 0
        self.maxphyaddr = maxphyaddr
        # KVM's own page tables live in the top half of host memory; VMM processes share the rest.
        self.kernel_base = 1 << (maxphyaddr - 1)
        self.vmm_region = min(1 << 40, (self.kernel_base - _VMM_BASE) // 8) & ~0xFFFFF
        self.mem = SparseMemory(1 << maxphyaddr, name="host physical memory")
        self.memory_limit = memory_limit
        self._next_vmm = 0
        self._next_kernel_pfn = hpa_to_pfn(self.kernel_base)
        self._free_kernel_pfns: list[int] = []
        self._next_dma32_pfn = hpa_to_pfn(_DMA32_BASE)
        self._free_dma32_pfns: list[int] = []
        self.kernel_pages_in_use = 0
        self.mmu_notifiers: list[MmuNotifier] = []

    def register_mmu_notifier(self, notifier: MmuNotifier) -> None:
        """mmu_notifier_register: `notifier` hears of every unmap and aging of host pages from now on."""
        self.mmu_notifiers.append(notifier)

    def new_vmm_region(self) -> tuple[int, int]:
        """[start, end) of a fresh VMM process address space for one VM's guest RAM."""
        start = _VMM_BASE + self._next_vmm * self.vmm_region
        self._next_vmm += 1
        if start + self.vmm_region > self.kernel_base:
            raise InvalidArgument("VMs on this host", self._next_vmm,
                                  f"a host with MAXPHYADDR {self.maxphyaddr} has room for "
                                  f"{(self.kernel_base - _VMM_BASE) // self.vmm_region} VMM address spaces")
        return start, start + self.vmm_region

    def alloc_kernel_page(self, dma32: bool = False) -> int:
        """A zeroed 4 KiB kernel page; returns its host physical address.

        dma32 pages lie below 4 GiB: KVM's PAE root must, because the CPU loads a 32-bit CR3.
        """
        if dma32:
            if self._free_dma32_pfns:
                pfn = self._free_dma32_pfns.pop()
            else:
                pfn = self._next_dma32_pfn
                self._next_dma32_pfn += 1
        else:
            pfn = self._free_kernel_pfns.pop() if self._free_kernel_pfns else self._take_pfn()
        self.kernel_pages_in_use += 1
        return pfn_to_hpa(pfn)

    def _take_pfn(self) -> int:
        pfn = self._next_kernel_pfn
        self._next_kernel_pfn += 1
        return pfn

    def free_kernel_page(self, hpa: int) -> None:
        self.mem.drop_page(hpa_to_pfn(hpa))
        (self._free_dma32_pfns if hpa < _VMM_BASE else self._free_kernel_pfns).append(hpa_to_pfn(hpa))
        self.kernel_pages_in_use -= 1

    # -- host memory pressure -------------------------------------------------------------------------
    def is_resident(self, pfn: int) -> bool:
        """A page the host can map without sleeping (what a non-sleeping get_user_pages finds)."""
        return self.memory_limit is None or pfn in self.resident

    def mapping_level(self, pfn: int, level: int) -> int:
        """The largest level, up to `level`, at which the host maps `pfn` with one huge page (what
        host_pfn_mapping_level reads from the host's page tables).  Under a memory limit, where the
        model tracks residency per 4 KiB page, a frame is one huge page only while every page of it
        is resident and none was ever swapped (swapping part of a huge page splits it for good), and
        never at a level whose frame was split (swap, or a write to the huge zero page that split it)."""
        while level > 1:
            span = 1 << (9 * (level - 1))
            if (level, pfn >> (9 * (level - 1))) not in self.split_frames:
                if self.memory_limit is None:
                    return level
                first = pfn & ~(span - 1)
                if all(p in self.resident for p in range(first, first + span)):
                    return level
            level -= 1
        return level

    def anon_fault(self, pfn: int, write: bool, span: int = 1) -> bool:
        """A read or write of guest page `pfn` by someone who may sleep (the VMM, KVM's copy to/from
        user, get_user_pages), on a host page of `span` 4 KiB pages (512: a transparent huge page,
        whose read fault maps the huge zero page and whose write fault allocates the whole frame).
        True if the write copied the zero page: the MMU notifier has dropped every VM's sptes for the
        frame by then."""
        if self.prealloc or pfn in self.populated:
            return False
        if span == 512 and (2, pfn >> 9) in self.split_frames:
            span = 1                     # the frame was split into 4 KiB pages
        first = pfn & ~(span - 1)
        pages = range(first, first + span)
        if not write:
            self.zero_mapped.update(p for p in pages if p not in self.populated)
            return False
        if span > 1 and self.huge_zero_wp == "split" and pfn in self.zero_mapped:
            return self._split_huge_zero(pfn, pages)
        cow = any(p in self.zero_mapped for p in pages)
        self.populated.update(pages)
        self.zero_mapped.difference_update(pages)
        if not cow:
            return False                 # a fresh page where nothing was mapped: no notifier
        self.cows += 1
        for notifier in self.mmu_notifiers:
            for p in pages:
                notifier.invalidate_range(pfn_to_hpa(p), pfn_to_hpa(p + 1))
        return True

    def _split_huge_zero(self, pfn: int, pages: range) -> bool:
        """Linux 6.1's write to the huge zero page: __split_huge_pmd (the MMU notifier over the whole
        frame) leaves 4 KiB zero-page PTEs, then the fault copies the written one (the notifier again)."""
        self.split_frames.add((2, pfn >> 9))
        for notifier in self.mmu_notifiers:
            for p in pages:
                notifier.invalidate_range(pfn_to_hpa(p), pfn_to_hpa(p + 1))
        self.populated.add(pfn)
        self.zero_mapped.discard(pfn)
        self.cows += 1
        for notifier in self.mmu_notifiers:
            notifier.invalidate_range(pfn_to_hpa(pfn), pfn_to_hpa(pfn + 1))
        return True

    def is_present(self, pfn: int, write: bool) -> bool:
        """What a non-sleeping lookup of the host page finds: a page mapped for reading (the zero page
        counts) or, with `write`, mapped writable (get_user_page_fast_only with FOLL_WRITE)."""
        if not self.is_resident(pfn):
            return False
        if self.prealloc or pfn in self.populated:
            return True
        return not write and pfn in self.zero_mapped

    def touch(self, pfn: int) -> bool:
        """KVM touches guest page `pfn` (sleeping fault-in allowed); True if that was a swap-in."""
        resident = self.resident
        if pfn in resident:
            resident.move_to_end(pfn)
            return False
        resident[pfn] = None
        if pfn in self.swapped:
            self.swapped.discard(pfn)
            self.swapins += 1
            return True
        return False

    def pages_in_use(self) -> int:
        return len(self.resident) + self.kernel_pages_in_use + (self.reserved >> 12)

    def over_limit(self) -> int:
        """How many pages must be reclaimed to get back under the limit."""
        if self.memory_limit is None:
            return 0
        return max(0, self.pages_in_use() - (self.memory_limit >> 12))

    def pin_walk(self, pfns: list[int]) -> None:
        """The CPU's 2-D walk took an exit after going through these guest pages (its table pages so
        far): reclaim leaves them alone until the walk completes (`unpin_walk`) or another walk exits.

        Why: under EPT/NPT the retried walk needs every guest table page and the data page mapped at
        the same time.  Reclaiming one of them while KVM faults in the next one would make the walk
        exit on it again, forever, on a host with little room.  Linux does not get there: those pages
        were just used (the walk set their EPT/NPT accessed bits, and faulted-in pages start at the
        young end of the LRU), and a page is never reclaimed while get_user_pages holds it.  One walk
        is in flight at a time (the model runs one access at a time), so the latest exit's pages
        replace the previous set; a set left by an abandoned walk is at most one walk's pages.
        """
        self.walk_pins = frozenset(pfns)

    def unpin_walk(self) -> None:
        """The 2-D walk completed: its pages are ordinary LRU pages again.  (A walk that ends another
        way, in a guest fault or emulation, keeps its few pages pinned until the next walk exits or
        completes; that only delays their reclaim.)"""
        self.walk_pins = frozenset()

    def reclaim(self, keep: int | None = None) -> int:
        """Swap out least recently touched pages until the host is under its limit; returns pages reclaimed.

        Second chance: a page some VM's sptes say is young (accessed since the last look) has its
        accessed bits cleared (kvm_age_gfn) and moves to the young end, at most once per page per call.

        In use, never reclaimed: `keep` (the page being faulted in right now; get_user_pages holds a
        reference to it) and the pages of the 2-D walk in flight (`walk_pins`).  If only those are
        left, the host stays over `memory_limit - reserved` until a later reclaim (they are borrowed
        from `reserved`, the rest of the host, as Linux's global reclaim would take pages from other
        processes and caches, or an allocation dips into the free-page reserves, rather than evict a
        page the access is using); see `reclaims_short`.  If the host's whole `memory_limit` cannot
        hold KVM's pages plus the pages in use, raises HostOutOfMemory: Linux's OOM killer would now
        kill the VMM.
        """
        need = self.over_limit()
        if not need:
            return 0
        pins = self.walk_pins
        resident = self.resident
        done = 0
        looked: set[int] = set()
        while need > 0:
            # The oldest page not in use (those in use were touched last, so this scan is short).
            pfn = next((p for p in resident if p != keep and p not in pins), None)
            if pfn is None:
                break
            if pfn not in looked:
                looked.add(pfn)
                if any(notifier.clear_young(pfn_to_hpa(pfn), pfn_to_hpa(pfn + 1)) for notifier in self.mmu_notifiers):
                    self.second_chances += 1
                    resident.move_to_end(pfn)
                    continue
            self.swap_out_pages([pfn])
            need -= 1
            done += 1
        if need > 0:
            self.reclaims_short += 1
            total = (self.memory_limit or 0) >> 12     # need > 0: there is a limit
            if len(resident) + self.kernel_pages_in_use > total:
                raise HostOutOfMemory(
                    "host memory_limit", self.memory_limit,
                    f"the host's {total} pages cannot hold KVM's {self.kernel_pages_in_use} kernel pages plus the "
                    f"{len(resident)} guest pages the current access needs at once (out of memory: Linux "
                    f"would OOM-kill the VMM)")
        return done

    def swap_out_pages(self, pfns: list[int]) -> int:
        """Swap out these guest pages now (an experiment's knob, or reclaim): every VM mapping them first
        drops its sptes (the mmu notifier), then the page leaves memory.  Returns how many were resident."""
        try:
            pfns = list(pfns)
        except TypeError:
            raise InvalidArgument("pfns", pfns, "swap_out_pages takes an iterable of host page frame numbers") from None
        for pfn in pfns:
            if type(pfn) is not int or pfn < 0 or pfn >> 52:
                raise InvalidArgument("pfn", pfn, "a host page frame number is an int in [0, 2^52)")
        n = 0
        for pfn in pfns:
            if self.memory_limit is None or pfn in self.resident:
                for notifier in self.mmu_notifiers:
                    notifier.invalidate_range(pfn_to_hpa(pfn), pfn_to_hpa(pfn + 1))
                if self.memory_limit is None:
                    continue           # no residency tracking: nothing to swap
                del self.resident[pfn]
                self.swapped.add(pfn)
                self.split_frames.update(((2, pfn >> 9), (3, pfn >> 18)))
                self.swapouts += 1
                n += 1
        return n

    def is_kernel_address(self, hpa: int) -> bool:
        return hpa >= self.kernel_base or _DMA32_BASE <= hpa < _VMM_BASE
