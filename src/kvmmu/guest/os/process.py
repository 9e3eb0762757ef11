"""Processes: spawning, fork (copying the page tables, write-protecting private pages), exec and exit."""

from __future__ import annotations

from ...arch.bits import PT_ACCESSED_MASK, PT_DIRTY_MASK
from ..pagetables import RW
from .kmem import KernelMemory
from .params import GuestPanic, Program
from .structs import Cpu, Image, Process, UserPage, Vma


class Processes(KernelMemory):
    """GuestOS's process management (a mixin: state.KernelState)."""

    def spawn(self, name: str, program: Program, pin: int | None = None, kernel_thread: bool = False,
              parent: Process | None = None, image: Image | None = None) -> Process:
        """A new process (or kernel thread) made runnable; its program's first op runs when scheduled.
        A process starts with `image`'s VMAs (without one: just an empty heap and a stack)."""
        vcpu = self.cpus[0].vcpu
        mm = None if kernel_thread else self._new_mm(vcpu)
        if mm is not None:
            mm.vmas = self._image_vmas(image)
        proc = Process(self.next_pid, name, mm, program, parent=parent, pin=pin)
        proc.kstack = self.frames.alloc()
        self.next_pid += 1
        self.procs[proc.pid] = proc
        self._enqueue(proc, None)
        return proc

    def do_fork(self, cpu: Cpu, parent: Process, program: Program, name: str | None = None) -> Process:
        vcpu = cpu.vcpu
        self.counters["forks"] += 1
        self._charge(cpu, self.p.cost_fork)
        mm = self._new_mm(vcpu)
        pmm = parent.user_mm("fork")
        mm.vmas = [Vma(v.start, v.end, v.pte_flags, v.kind, v.file, v.file_page, v.private) for v in pmm.vmas]
        mm.brk, mm.mmap_next = pmm.brk, pmm.mmap_next
        wrprotected = False
        for vpn in sorted(pmm.pages):
            page = pmm.pages[vpn]
            va = vpn << 12
            pte = self.read_user_pte(vcpu, pmm, va)                  # copy_pte_range reads the parent's PTE
            vma = pmm.find_vma(va)
            if vma is None:
                raise GuestPanic(f"fork of {parent.name}[{parent.pid}]: page {va:#x} lies in no VMA")
            if vma.private and vma.writable and page.writable:
                pte &= ~RW
                self.set_user_pte(vcpu, pmm, va, pte)                 # ptep_set_wrprotect
                page.writable, page.cow = False, True
                wrprotected = True
            elif vma.private and vma.writable:
                page.cow = True
            self.frames.get(page.gfn)
            mm.pages[vpn] = UserPage(page.gfn, page.writable, page.cow)
            self.set_user_pte(vcpu, mm, va, pte & ~(PT_ACCESSED_MASK | PT_DIRTY_MASK))   # the child's PTE, A/D clear
            self._charge(cpu, self.p.cost_per_pte)
        if wrprotected:
            self.flush_tlb_mm(cpu, pmm)
        child = Process(self.next_pid, name or parent.name, mm, program, parent=parent, pin=None)
        child.kstack = self.frames.alloc()
        self.next_pid += 1
        self.procs[child.pid] = child
        parent.children.append(child)
        self._enqueue(child, cpu.clock, cpu)
        return child

    def do_exec(self, cpu: Cpu, proc: Process, image: Image) -> None:
        vcpu = cpu.vcpu
        self.counters["execs"] += 1
        self._charge(cpu, self.p.cost_exec)
        old = proc.mm
        mm = self._new_mm(vcpu)
        mm.vmas = self._image_vmas(image)
        proc.mm = mm
        proc.name = image.name
        self._switch_mm(cpu, mm)
        if old is not None:
            self.exit_mmap(cpu, old)

    def do_exit(self, cpu: Cpu, proc: Process, now: int) -> None:
        self.counters["exits"] += 1
        self._charge(cpu, self.p.cost_exit)
        if proc.mm is not None:
            self.exit_mmap(cpu, proc.mm)
        proc.state = "zombie"
        self.frames.put(proc.kstack)
        parent = proc.parent
        if parent is not None and parent.state != "zombie":
            parent.zombies += 1
            parent.children.remove(proc)
            if parent.waiting_child and parent.state == "blocked":
                parent.waiting_child = False
                self._enqueue(parent, now, cpu)
        del self.procs[proc.pid]
        for child in proc.children:
            child.parent = None
        cpu.current = None
        cpu.need_resched = True
