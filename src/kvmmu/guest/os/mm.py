"""Memory management: new address spaces, the page-fault handler (demand paging, the page cache,
copy-on-write), mmap / munmap / brk, TLB flushes and tearing an address space down."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..pagetables import NX, RW, US, P
from .kmem import KernelMemory
from .layout import (
    KERNEL_PGD_SLOTS,
    PF_FETCH,
    PF_WRITE,
    TLB_SINGLE_PAGE_FLUSH_CEILING,
    USER_DATA,
    USER_HEAP,
    USER_STACK_TOP,
    USER_TEXT,
)
from .params import GuestPanic
from .structs import MM, Cpu, File, Image, Process, UserPage, Vma

if TYPE_CHECKING:
    from ...kvm.vcpu import GuestFault, Vcpu


class MemoryManager(KernelMemory):
    """GuestOS's memory management (a mixin: state.KernelState)."""

    def _new_mm(self, vcpu: Vcpu) -> MM:
        """pgd_alloc: a zeroed PGD with the kernel's entries copied from init_mm."""
        pgd = self.frames.alloc()
        self.clear_page(vcpu, pgd)
        for slot in KERNEL_PGD_SLOTS:
            entry = self.vm.read_guest_quiet((self.kpgd << 12) + 8 * slot, 8)
            self.kwrite(vcpu, (pgd << 12) + 8 * slot, entry)
        mm = self.mms[pgd] = MM(pgd)
        return mm

    # -- the page-fault handler --------------------------------------------------------------------
    def page_fault(self, cpu: Cpu, proc: Process, fault: GuestFault, now: int) -> str:
        """do_page_fault: 'fixed' (retry the access), 'blocked' (waiting for I/O) or 'segv'."""
        vcpu = cpu.vcpu
        mm = proc.mm
        va = fault.cr2
        ec = fault.error_code
        self.counters["page_faults"] += 1
        proc.stats["faults"] += 1
        self._charge(cpu, self.p.cost_fault)
        if va is None:
            raise GuestPanic(f"process {proc.name}[{proc.pid}]: a #PF without CR2: {fault}")
        vma = mm.find_vma(va) if mm is not None else None
        write, fetch = bool(ec & PF_WRITE), bool(ec & PF_FETCH)
        if mm is None or vma is None or (write and not vma.writable) or (fetch and not vma.executable):
            self.counters["segfaults"] += 1
            return "segv"
        self.kread(vcpu, (self.slab[proc.pid % len(self.slab)] << 12) + 8 * (proc.pid % 512))   # the mm / VMA
        vpn = va >> 12
        page = mm.pages.get(vpn)
        base = vpn << 12
        if page is None:
            if vma.kind == "anon":
                gfn = self.frames.alloc()
                self.clear_page(vcpu, gfn)
                page = UserPage(gfn, vma.writable)
            else:
                file = vma.file
                if file is None:
                    raise GuestPanic(f"process {proc.name}[{proc.pid}]: a file VMA without a file at {va:#x}")
                idx = vma.file_page + ((base - vma.start) >> 12)
                cached = self.page_cache.get((file.fid, idx))
                if cached is None:
                    self._page_cache_fill(cpu, proc, file, [idx], now)
                    return "blocked"
                self.page_cache.move_to_end((file.fid, idx))
                if vma.private and write:
                    gfn = self.frames.alloc()
                    self.copy_page(vcpu, cached, gfn)
                    page = UserPage(gfn, True)
                else:
                    self.frames.get(cached)
                    page = UserPage(cached, vma.writable and not vma.private, cow=vma.private and vma.writable)
            mm.pages[vpn] = page
            self.set_user_pte(vcpu, mm, base, (page.gfn << 12) | self._pte_flags(vma, page))
            return "fixed"
        if write and page.cow:
            self.counters["cow_faults"] += 1
            proc.stats["cow"] += 1
            if self.frames.refs.get(page.gfn, 0) == 1:          # nobody else maps it (the page cache holds a ref)
                page.cow = False
                page.writable = True
            else:
                new = self.frames.alloc()
                self.copy_page(vcpu, page.gfn, new)
                self._put_page(page.gfn)
                page.gfn, page.cow, page.writable = new, False, True
            self.set_user_pte(vcpu, mm, base, (page.gfn << 12) | self._pte_flags(vma, page))
            vcpu.invlpg(base)                         # flush_tlb_page
            self.counters["invlpgs"] += 1
            return "fixed"
        return "fixed"           # spurious: the PTE already allows it (another CPU fixed it, or a stale TLB)

    @staticmethod
    def _pte_flags(vma: Vma, page: UserPage) -> int:
        flags = (vma.pte_flags & ~RW) | (RW if page.writable else 0)
        return flags

    def _put_page(self, gfn: int) -> None:
        self.frames.put(gfn)

    # -- page cache --------------------------------------------------------------------------------
    def _page_cache_fill(self, cpu: Cpu, proc: Process, file: File, pages: list[int], now: int) -> None:
        """Allocate page-cache pages for a read miss and submit one disk request; the process sleeps."""
        self._reclaim_if_low(cpu)
        for idx in pages:
            gfn = self.frames.alloc()
            self.page_cache[(file.fid, idx)] = gfn
            self.counters["page_cache_misses"] += 1
        self.disk_request(cpu, now, proc)

    def _reclaim_if_low(self, cpu: Cpu) -> None:
        cap = (self.p.page_cache_mib << 8) if self.p.page_cache_mib else None
        while self.page_cache and (self.frames.nr_free < self.p.min_free_pages
                                   or (cap is not None and len(self.page_cache) >= cap)):
            key, gfn = next(iter(self.page_cache.items()))
            if self.frames.refs.get(gfn, 0) > 1:
                self.page_cache.move_to_end(key)          # mapped by someone: keep it
                if all(self.frames.refs.get(g, 0) > 1 for g in list(self.page_cache.values())[:64]):
                    break
                continue
            del self.page_cache[key]
            self.frames.put(gfn)
            self.counters["page_cache_reclaims"] += 1

    # -- address spaces: exec, exit, munmap, mmap, brk ---------------------------------------------
    def flush_tlb_mm(self, cpu: Cpu, mm: MM) -> None:
        """flush_tlb_mm on the CPU running it: reload CR3 (no PCID)."""
        self.counters["tlb_flushes"] += 1
        if cpu.cr3 == mm.pgd:
            cpu.vcpu.write_cr3(mm.pgd << 12)

    @staticmethod
    def _image_vmas(image: Image | None) -> list[Vma]:
        """The VMAs exec sets up: text, data (private file pages), bss, an empty heap, the stack."""
        heap_and_stack = [Vma(USER_HEAP, USER_HEAP, P | US | RW | NX, "anon"),
                          Vma(USER_STACK_TOP - ((image.stack_pages if image else 8) << 12), USER_STACK_TOP,
                              P | US | RW | NX, "anon")]
        if image is None:
            return heap_and_stack
        data_end = USER_DATA + (image.data_pages << 12)
        return [
            Vma(USER_TEXT, USER_TEXT + (image.text_pages << 12), P | US, "file", image.file, 0, private=True),
            Vma(USER_DATA, data_end, P | US | RW | NX, "file", image.file, image.text_pages, private=True),
            Vma(data_end, data_end + (image.bss_pages << 12), P | US | RW | NX, "anon"),
            *heap_and_stack,
        ]

    def exit_mmap(self, cpu: Cpu, mm: MM) -> None:
        """Clear every PTE, clear and free the page tables; the PGD goes once no CPU has it loaded."""
        vcpu = cpu.vcpu
        for vpn in sorted(mm.pages):
            page = mm.pages[vpn]
            pt = mm.tables[(1, vpn >> 9)]
            self.kwrite(vcpu, (pt << 12) + 8 * (vpn & 511), 0)
            self._put_page(page.gfn)
        self._charge(cpu, self.p.cost_per_pte * len(mm.pages))
        mm.pages.clear()
        for (level, key) in sorted(mm.tables, key=lambda k: (k[0], k[1])):
            table = mm.tables[(level, key)]
            va = key << (12 + 9 * level)
            parent = mm.pgd if level == 3 else mm.tables[(level + 1, va >> (12 + 9 * (level + 1)))]
            self.kwrite(vcpu, (parent << 12) + 8 * self._index(va, level + 1), 0)      # pmd/pud/pgd_clear
            self.frames.put(table)
        mm.tables.clear()
        if cpu.cr3 == mm.pgd:
            self.flush_tlb_mm(cpu, mm)
        mm.dead = True
        if not mm.loaded_on:
            self._free_pgd(mm)

    def _free_pgd(self, mm: MM) -> None:
        """pgd_free, once no CPU has the PGD in CR3 (lazy TLB: an idle CPU keeps the last one loaded)."""
        del self.mms[mm.pgd]
        self.frames.put(mm.pgd)

    def do_munmap(self, cpu: Cpu, proc: Process, start: int, npages: int) -> None:
        vcpu = cpu.vcpu
        mm = proc.user_mm("munmap")
        self.counters["munmaps"] += 1
        end = start + (npages << 12)
        cleared = []
        for vpn in range(start >> 12, end >> 12):
            page = mm.pages.pop(vpn, None)
            if page is None:
                continue
            pt = mm.tables[(1, vpn >> 9)]
            self.kwrite(vcpu, (pt << 12) + 8 * (vpn & 511), 0)
            cleared.append(vpn)
            self._put_page(page.gfn)
        self._charge(cpu, self.p.cost_per_pte * len(cleared))
        if len(cleared) > TLB_SINGLE_PAGE_FLUSH_CEILING:
            self.flush_tlb_mm(cpu, mm)
        else:
            for vpn in cleared:
                vcpu.invlpg(vpn << 12)
                self.counters["invlpgs"] += 1
        kept = []
        for v in mm.vmas:
            if v.end <= start or v.start >= end:
                kept.append(v)
                continue
            if v.start < start:
                kept.append(Vma(v.start, start, v.pte_flags, v.kind, v.file, v.file_page, v.private))
            if v.end > end:
                kept.append(Vma(end, v.end, v.pte_flags, v.kind, v.file,
                                v.file_page + ((end - v.start) >> 12), v.private))
        mm.vmas = kept

    def do_mmap(self, proc: Process, npages: int, writable: bool = True, file: File | None = None,
                file_page: int = 0) -> int:
        mm = proc.user_mm("mmap")
        start = mm.mmap_next
        mm.mmap_next += (npages + 1) << 12
        flags = P | US | NX | (RW if writable else 0)
        mm.vmas.append(Vma(start, start + (npages << 12), flags, "file" if file else "anon", file, file_page,
                           private=True))
        return start

    def do_brk(self, proc: Process, npages: int) -> int:
        mm = proc.user_mm("brk")
        heap = next(v for v in mm.vmas if v.start == USER_HEAP)
        old = heap.end
        heap.end += npages << 12
        mm.brk = heap.end
        return old
