"""What GuestOS's parts share: the kernel's state, and the routines one part calls in another.

GuestOS is built from mixins by concern (kmem, drivers, mm, process, sched, syscalls) that read and
write one kernel's state and call each other (the scheduler sends IPIs through the APIC driver, the
driver wakes processes through the scheduler...).  `KernelState` declares that state once, so each
part is checked against the same types; `kernel.GuestOS.__init__` and `boot` assign it.  kmem's
memory primitives are the base the other parts inherit (`KernelMemory(KernelState)`); the routines
those parts call across each other, a cycle no base order could express, are declared below for
the type checker only: they do not exist at run time (nothing is looked up in them), and mypy
checks that each real definition matches where GuestOS inherits both.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from ...sim.clock import Clock, EventQueue
from ...sim.cost import CostModel
from .params import Op, OsParams, Program
from .structs import MM, Cpu, File, Frames, Image, Process, Vma

if TYPE_CHECKING:
    from ...kvm.vcpu import GuestFault, Vcpu
    from ...kvm.vm import VM
    from ..platform import Platform
    from ..workloads import Workload

# A system call's handler (syscalls.Syscalls._op_*): (kernel, cpu, process, op, end of the slice) ->
# (done, reply).  The kernel is typed Any: the handlers are Syscalls methods, called with the GuestOS.
OpHandler = Callable[[Any, Cpu, Process, Op, int], tuple[bool, Any]]
Interrupt = Callable[[Cpu, int], int]          # fn(cpu, now) -> native cycles it used
VmmTimer = Callable[[int], None]               # fn(now), run by the VMM thread


class KernelState:
    """The state of one modelled kernel (assigned by GuestOS.__init__, the rest by GuestOS.boot)."""

    machine: Platform
    vm: VM
    p: OsParams
    rng: random.Random
    cost: CostModel
    _vcpu_cost: Callable[[Vcpu], int]          # the cost model's charge so far for one vCPU
    _vm_cost: Callable[[VM], int]              # ... and for the VM's own stats
    vm_last_cost: int
    frames: Frames
    page_cache: OrderedDict[tuple[int, int], int]    # (file id, page) -> gfn, least recently used first
    files: list[File]
    procs: dict[int, Process]
    next_pid: int
    global_rq: deque[Process]
    clock: Clock
    cpus: list[Cpu]
    tick_period: int
    ktables: dict[tuple[int, int], int]        # init_mm's tables: (level, va >> (12 + 9*level)) -> gfn
    ioremaps: dict[str, int]                   # device name -> its ioremap'd virtual address
    _vmalloc_next: int
    wake_requests: list[tuple[int, int]]       # (cpu index, time): the host must run it then
    vmm_timers: EventQueue[VmmTimer]
    counters: dict[str, int]
    cr0: int
    done: bool
    booted: bool
    irq_handlers: dict[str, Interrupt]
    workload: Workload | None                  # the workload driving this kernel (scenario sets it)
    mms: dict[int, MM]                         # PGD gfn -> mm, until the PGD is freed
    kpgd: int                                  # init_mm's PGD (boot)
    slab: list[int]                            # kernel data pages touched on syscalls and faults (boot)
    ring_page: int                             # the virtio-blk ring (boot)
    _ops: ClassVar[dict[str, OpHandler]]       # system call name -> handler (syscalls)

    if TYPE_CHECKING:
        # -- drivers --------------------------------------------------------------------------------
        def send_ipi(self, src: Cpu, dst: Cpu) -> None: ...
        def eoi(self, cpu: Cpu) -> None: ...
        def disk_request(self, cpu: Cpu, now: int, waiter: Process | None, latency_us: float = 100.0) -> None: ...

        # -- mm ------------------------------------------------------------------------------------
        def _new_mm(self, vcpu: Vcpu) -> MM: ...
        def page_fault(self, cpu: Cpu, proc: Process, fault: GuestFault, now: int) -> str: ...
        def _page_cache_fill(self, cpu: Cpu, proc: Process, file: File, pages: list[int], now: int) -> None: ...
        def _reclaim_if_low(self, cpu: Cpu) -> None: ...
        def flush_tlb_mm(self, cpu: Cpu, mm: MM) -> None: ...
        @staticmethod
        def _image_vmas(image: Image | None) -> list[Vma]: ...
        def exit_mmap(self, cpu: Cpu, mm: MM) -> None: ...
        def _free_pgd(self, mm: MM) -> None: ...
        def do_munmap(self, cpu: Cpu, proc: Process, start: int, npages: int) -> None: ...
        def do_mmap(self, proc: Process, npages: int, writable: bool = True, file: File | None = None,
                    file_page: int = 0) -> int: ...
        def do_brk(self, proc: Process, npages: int) -> int: ...

        # -- process -------------------------------------------------------------------------------
        def do_fork(self, cpu: Cpu, parent: Process, program: Program, name: str | None = None) -> Process: ...
        def do_exec(self, cpu: Cpu, proc: Process, image: Image) -> None: ...
        def do_exit(self, cpu: Cpu, proc: Process, now: int) -> None: ...

        # -- sched ---------------------------------------------------------------------------------
        def _enqueue(self, proc: Process, now: int | None, src: Cpu | None = None) -> None: ...
        def at(self, cpu: Cpu, when: int, fn: Interrupt) -> None: ...
        def _switch_mm(self, cpu: Cpu, mm: MM | None) -> None: ...
        def _charge(self, cpu: Cpu, cycles: int) -> None: ...
        def _account(self, cpu: Cpu) -> None: ...
