"""The kernel's data structures: the page allocator, files and images, VMAs, address spaces,
processes and the per-CPU state."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...sim.clock import EventQueue
from ..pagetables import NX, RW
from .layout import PAGE, USER_HEAP, USER_MMAP
from .params import GuestPanic, Op, Program

if TYPE_CHECKING:
    from ...kvm.vcpu import Vcpu

class Frames:
    """The page allocator: guest frames handed out LIFO (recently freed, cache-hot frames first, as the
    per-CPU free lists do), with reference counts for shared pages."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.free: list[int] = []
        for start, end in reversed(ranges):
            self.free.extend(range((end >> 12) - 1, (start + PAGE - 1 >> 12) - 1, -1))
        self.total = len(self.free)
        self.refs: dict[int, int] = {}

    def alloc(self) -> int:
        if not self.free:
            raise GuestPanic("the guest is out of memory (no free frame): give it more RAM or a smaller workload")
        gfn = self.free.pop()
        self.refs[gfn] = 1
        return gfn

    def get(self, gfn: int) -> None:
        self.refs[gfn] += 1

    def put(self, gfn: int) -> bool:
        n = self.refs[gfn] - 1
        if n:
            self.refs[gfn] = n
            return False
        del self.refs[gfn]
        self.free.append(gfn)
        return True

    @property
    def nr_free(self) -> int:
        return len(self.free)


@dataclass
class File:
    """A file whose pages live in the page cache once read."""

    fid: int
    name: str
    pages: int


@dataclass(frozen=True)
class Image:
    """An executable: text (shared, from `file`), data (private copy of the file's next pages), bss, stack."""

    name: str
    file: File
    text_pages: int
    data_pages: int = 4
    bss_pages: int = 4
    stack_pages: int = 8


@dataclass
class Vma:
    start: int
    end: int
    pte_flags: int           # P|US, +RW if writable, +NX if not executable
    kind: str                # anon | file
    file: File | None = None
    file_page: int = 0       # file page of `start`
    private: bool = True

    @property
    def writable(self) -> bool:
        return bool(self.pte_flags & RW)

    @property
    def executable(self) -> bool:
        return not self.pte_flags & NX


@dataclass
class UserPage:
    gfn: int
    writable: bool           # RW set in the PTE
    cow: bool = False        # private page shared with another mm (or with the page cache)


class MM:
    """A process address space: its PGD, which table pages exist, the pages mapped, the VMAs."""

    def __init__(self, pgd: int) -> None:
        self.pgd = pgd
        self.tables: dict[tuple[int, int], int] = {}       # (level, va >> (12 + 9*level)) -> table gfn
        self.pages: dict[int, UserPage] = {}
        self.vmas: list[Vma] = []
        self.brk = USER_HEAP
        self.mmap_next = USER_MMAP
        self.dead = False
        self.loaded_on: set[int] = set()                  # CPUs whose CR3 points at this PGD

    def find_vma(self, va: int) -> Vma | None:
        for v in self.vmas:
            if v.start <= va < v.end:
                return v
        return None


@dataclass
class Process:
    pid: int
    name: str
    mm: MM | None
    program: Program
    parent: Process | None = None
    state: str = "runnable"          # runnable | running | blocked | zombie
    pin: int | None = None           # CPU affinity (None: any)
    kstack: int = 0                  # gfn of the kernel stack page
    pending: Op | None = None        # the operation being executed (kept while blocked)
    reply: Any = None
    compute_left: int = 0
    children: list[Process] = field(default_factory=list)
    zombies: int = 0
    waiting_child: bool = False
    sleeping: bool = False
    started: bool = False
    stats: dict[str, int] = field(default_factory=lambda: {"faults": 0, "cow": 0, "ops": 0})

    def user_mm(self, what: str) -> MM:
        """The address space `what` works on; a kernel thread has none, so it may not ask."""
        mm = self.mm
        if mm is None:
            raise GuestPanic(f"process {self.name}[{self.pid}]: {what}: a kernel thread has no address space")
        return mm


@dataclass
class Cpu:
    """The kernel's per-CPU state for one vCPU."""

    index: int
    vcpu: Vcpu
    current: Process | None = None
    cr3: int = 0                      # gfn of the loaded PGD
    next_tick: int = 0
    ticking: bool = False
    slice_ticks: int = 0
    need_resched: bool = False
    # interrupts due: fn(cpu, now) -> the native cycles it used
    events: EventQueue[Callable[[Cpu, int], int]] = field(default_factory=EventQueue)
    runqueue: deque[Process] = field(default_factory=deque)
    idle: bool = True
    last_cost: int = 0
    last_exits: int = -1
    last_walks: int = -1
    clock: int = 0

