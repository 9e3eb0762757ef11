"""A modelled guest OS: a small Linux-shaped kernel that runs on a machine's vCPUs.

Everything it does to memory goes through its vCPUs (`vcpu.access`), so KVM sees what it would see
from a real guest: the kernel writes every page-table entry of its processes *through the vCPU*
(a CPL0 store to the direct map), so under shadow paging each write to a shadowed table traps,
is emulated or unsyncs the page, exactly as KVM decides.

Address space (x86-64, 4-level paging, CR0.WP, EFER.NX):

    0x0000_0000_0040_0000     user text (file-backed, shared, read + exec)
    0x0000_0000_0080_0000     user data (file-backed, private: copy-on-write)
    0x0000_0000_0100_0000     heap (anonymous, grows with brk)
    0x0000_7f00_0000_0000     mmap area (anonymous mappings)
    0x0000_7ffd_0000_0000     stack (anonymous)
    0xffff_8880_0000_0000     direct map of all guest RAM, 2 MiB pages     (PML4 slot 273)
    0xffff_c900_0000_0000     vmalloc / ioremap area, 4 KiB pages, UC       (PML4 slot 402)
    0xffff_ffff_8100_0000     kernel image (gpa 16 MiB), 2 MiB pages       (PML4 slot 511)
    0xffff_ffff_ff5f_b000...  fixmap: HPET, IOAPIC, local APIC             (PML4 slot 511)

Boot: the kernel's initial tables (direct map, kernel image) are written by the VMM before the
vCPUs start, as firmware and the decompressor would with paging off; from then on every change
goes through a vCPU: fixmap and ioremap mappings of the drivers, all process page tables.

Processes have their own PGD (the kernel half copied from init_mm: the same three PUD tables),
demand paging with a #PF handler (anonymous zero pages, a page cache for files, copy-on-write),
fork (copy the page tables, write-protect private pages, flush the parent's TLB), exec (a fresh
mm), exit (clear every PTE and free the tables; the PGD is freed once no CPU has it loaded),
munmap (clear PTEs, INVLPG each page, or a full flush above 33 pages as Linux does), context
switches by MOV to CR3, and per-vCPU timer interrupts (EOI to the local APIC through the fixmap).

The kernel is deterministic: all choices come from `random.Random` seeded by the scenario seed.
Time is modelled in host cycles: what the guest computes natively (`OsParams` costs) plus what
the cost model charges for what KVM did (`report.cost.CostModel`).
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from ..errors import InvalidArgument, KvmmuError
from .pagetables import NX, PCD, PS, PWT, RW, US, G, P

if TYPE_CHECKING:
    from ..kvm.vcpu import GuestFault, Vcpu
    from ..vmm.machine import Machine

DIRECT_MAP = 0xFFFF888000000000
VMALLOC = 0xFFFFC90000000000
KTEXT = 0xFFFFFFFF81000000
KTEXT_GPA = 0x1000000
KTEXT_SIZE = 16 << 20
FIXMAP_APIC = 0xFFFFFFFFFF5FD000
FIXMAP_IOAPIC = 0xFFFFFFFFFF5FC000
FIXMAP_HPET = 0xFFFFFFFFFF5FB000
KERNEL_PGD_SLOTS = (273, 402, 511)
USER_TEXT = 0x400000
USER_DATA = 0x800000
USER_HEAP = 0x1000000
USER_MMAP = 0x7F0000000000
USER_STACK_TOP = 0x7FFD00000000
PAGE = 4096
TLB_SINGLE_PAGE_FLUSH_CEILING = 33          # Linux: above this, flush_tlb_range flushes everything
PF_PRESENT, PF_WRITE, PF_FETCH = 1, 2, 16

Op = tuple
Program = Generator[Op, Any, None]


class GuestPanic(KvmmuError):
    """The modelled guest OS cannot go on (e.g. out of memory for what the scenario asked)."""


OS_INT_MAX = 10**10                    # a native cost (cycles: 4 modelled s) or a size, at most


@dataclass(frozen=True)
class OsParams:
    """Guest kernel configuration and its native costs (host cycles of work a real kernel does)."""

    hz: int = 250                      # timer interrupts per second per busy vCPU
    apic: str = "xapic"                # xapic: EOI/ICR are MMIO writes; x2apic: MSRs (no MMIO)
    timer: str = "periodic"            # periodic | oneshot (a TMICT write per tick) | tsc-deadline (MSR)
    clocksource: str = "kvm-clock"     # kvm-clock | hpet (an HPET read per tick and per gettime)
    timeslice_ticks: int = 3
    ghz: float = 2.5                   # host cycles per nanosecond, to turn times into cycles
    boot_console_bytes: int = 64       # characters printed on the serial console at boot
    cost_fault: int = 1500             # native #PF handler work (find VMA, allocate, zero, set PTE)
    cost_syscall: int = 300
    cost_ctxsw: int = 2500
    cost_irq: int = 1200
    cost_fork: int = 40000
    cost_exec: int = 60000
    cost_exit: int = 25000
    cost_per_pte: int = 40             # per page-table entry copied / cleared (fork, exit, munmap)
    page_cache_mib: int = 0            # page cache cap (0: grows until memory is short, then reclaims)
    min_free_pages: int = 256          # reclaim the page cache below this many free frames

    def validate(self) -> None:
        if not isinstance(self.hz, int) or isinstance(self.hz, bool) or not 10 <= self.hz <= 10000:
            raise InvalidArgument("os.hz", self.hz, "the timer frequency is 10 to 10000 Hz")
        if self.apic not in ("xapic", "x2apic"):
            raise InvalidArgument("os.apic", self.apic, "the APIC mode is 'xapic' or 'x2apic'")
        if self.timer not in ("periodic", "oneshot", "tsc-deadline"):
            raise InvalidArgument("os.timer", self.timer, "the timer mode is 'periodic', 'oneshot' or 'tsc-deadline'")
        if self.clocksource not in ("kvm-clock", "hpet"):
            raise InvalidArgument("os.clocksource", self.clocksource, "the clocksource is 'kvm-clock' or 'hpet'")
        if not isinstance(self.ghz, (int, float)) or isinstance(self.ghz, bool) or not 0.1 <= self.ghz <= 10:
            raise InvalidArgument("os.ghz", self.ghz, "the clock is 0.1 to 10 GHz")
        if not isinstance(self.timeslice_ticks, int) or isinstance(self.timeslice_ticks, bool) \
                or not 1 <= self.timeslice_ticks <= 10000:
            raise InvalidArgument("os.timeslice_ticks", self.timeslice_ticks, "a timeslice is 1 to 10000 ticks")
        for name in ("boot_console_bytes", "cost_fault", "cost_syscall", "cost_ctxsw", "cost_irq", "cost_fork",
                     "cost_exec", "cost_exit", "cost_per_pte", "page_cache_mib", "min_free_pages"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= OS_INT_MAX:
                raise InvalidArgument(f"os.{name}", v, f"an integer from 0 to {OS_INT_MAX:,}")

    def cycles(self, seconds: float) -> int:
        return int(seconds * self.ghz * 1e9)


# -- memory ---------------------------------------------------------------------------------------------
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
    events: list = field(default_factory=list)    # heap of (time, seq, fn)
    runqueue: deque = field(default_factory=deque)
    idle: bool = True
    last_cost: int = 0
    last_exits: int = -1
    last_walks: int = -1
    clock: int = 0


# The guest kernel's own counters (GuestOS.counters; a scenario report's "guest" section).
OS_COUNTERS = (
    "forks", "execs", "exits", "page_faults", "cow_faults", "segfaults", "context_switches", "ticks",
    "lost_ticks", "irqs", "ipis", "munmaps", "invlpgs", "tlb_flushes", "disk_requests", "net_requests",
    "page_cache_misses", "page_cache_reclaims", "mmio_accesses", "mmio_fast_path", "mmio_slow_path",
    "mmio_to_userspace", "kernel_pte_writes", "native_cycles")


class GuestOS:
    """The kernel of one machine."""

    def __init__(self, machine: Machine, params: OsParams | None = None, seed: int = 1,
                 cost: Any = None) -> None:
        from ..report.cost import CostModel
        self.machine = machine
        self.vm = machine.vm
        self.p = params or OsParams()
        self.p.validate()
        self.rng = random.Random(f"kvmmu-os:{seed}:{machine.spec.name}")
        self.cost = cost or CostModel()
        self._vcpu_cost = self.cost.vcpu_cost_fn(machine.spec.mmu)
        self._vm_cost = self.cost.vm_cost_fn()
        self.vm_last_cost = 0
        self.frames = Frames(machine.ram_ranges())
        self.page_cache: OrderedDict[tuple[int, int], int] = OrderedDict()
        self.files: list[File] = []
        self.procs: dict[int, Process] = {}
        self.next_pid = 1
        self.global_rq: deque[Process] = deque()
        self.cpus = [Cpu(i, v) for i, v in enumerate(machine.vcpus)]
        self.tick_period = self.p.cycles(1 / self.p.hz)
        self._seq = 0
        self.ktables: dict[tuple[int, int], int] = {}
        self.ioremaps: dict[str, int] = {}
        self._vmalloc_next = VMALLOC
        self.wake_requests: list[tuple[int, int]] = []     # (cpu index, time): the host must run it then
        self.vmm_timers: list = []                          # heap of (time, seq, fn) run by the VMM thread
        self.counters: dict[str, int] = dict.fromkeys(OS_COUNTERS, 0)
        self.cr0 = X86_CR0_PG | X86_CR0_PE | X86_CR0_WP
        self.done = False
        self.booted = False
        self.irq_handlers: dict[str, Callable[[Cpu, int], int]] = {}
        self.workload: Any = None
        self.mms: dict[int, MM] = {}          # PGD gfn -> mm, until the PGD is freed

    # -- low-level kernel memory access (always through a vCPU) ------------------------------------------
    def kwrite(self, vcpu: Vcpu, gpa: int, value: int, size: int = 8) -> None:
        r = vcpu.access(DIRECT_MAP + gpa, size, "write", value, cpl=0)
        if r.fault is not None:
            raise GuestPanic(f"kernel store to the direct map at gpa {gpa:#x} faulted: {r.fault}")

    def kread(self, vcpu: Vcpu, gpa: int, size: int = 8) -> int:
        r = vcpu.access(DIRECT_MAP + gpa, size, "read", cpl=0)
        if r.fault is not None:
            raise GuestPanic(f"kernel load from the direct map at gpa {gpa:#x} faulted: {r.fault}")
        return r.value

    def mmio(self, vcpu: Vcpu, gva: int, size: int, kind: str, value: int | None = None) -> int | None:
        """A driver's access to an ioremap'd / fixmap'd device register."""
        c = self.counters
        c["mmio_accesses"] += 1
        st = vcpu.stats
        taken, exits = st["pf_taken"], st["exits"]
        r = vcpu.access(gva, size, kind, value, cpl=0)
        if st["pf_taken"] != taken:
            c["mmio_slow_path"] += 1          # the full fault path ran: the access missed the fast path
        elif st["exits"] != exits:
            c["mmio_fast_path"] += 1          # recognised as MMIO by the fast path (spte or MMIO cache)
        if r.mmio_exit_records:
            c["mmio_to_userspace"] += 1
        if r.fault is not None:
            raise GuestPanic(f"device register access at {gva:#x} faulted: {r.fault}")
        return r.value

    def clear_page(self, vcpu: Vcpu, gfn: int) -> None:
        """clear_page (`rep stosq`): stores through the vCPU until one completes without an exit (the
        page is then writable in KVM's tables and the TLB, so the rest would run natively too);
        the remaining bytes are then written the way the CPU would, without KVM seeing them."""
        base = gfn << 12
        st = vcpu.stats
        for off in range(0, PAGE, 8):
            before = st["exits"]
            self.kwrite(vcpu, base + off, 0)
            if st["exits"] == before:
                break
        else:
            return
        self.vm.write_phys(base, bytes(PAGE))

    def copy_page(self, vcpu: Vcpu, src: int, dst: int) -> None:
        """copy_page: a load from the source, stores to the destination as clear_page does, then the data."""
        self.kread(vcpu, src << 12)
        self.clear_page(vcpu, dst)
        self.vm.write_phys(dst << 12, self.vm.read_phys(src << 12, PAGE))

    # -- page tables ---------------------------------------------------------------------------------
    @staticmethod
    def _index(va: int, level: int) -> int:
        return (va >> (12 + 9 * (level - 1))) & 511

    def _table(self, vcpu: Vcpu | None, tables: dict, root: int, va: int, level: int, upper: int,
               alloc: Callable[[], int]) -> int:
        """gfn of the table at `level` covering va, creating the tables above it (through the vCPU, or the
        VMM before boot when vcpu is None)."""
        table = root
        for lvl in range(4, level, -1):
            key = (lvl - 1, va >> (12 + 9 * (lvl - 1)))
            child = tables.get(key)
            if child is None:
                child = alloc()
                if vcpu is None:
                    self.vm.write_phys(child << 12, bytes(PAGE))
                    self.vm.write_phys((table << 12) + 8 * self._index(va, lvl),
                                       ((child << 12) | upper).to_bytes(8, "little"))
                else:
                    self.clear_page(vcpu, child)
                    self.kwrite(vcpu, (table << 12) + 8 * self._index(va, lvl), (child << 12) | upper)
                    self.counters["kernel_pte_writes"] += 1
                tables[key] = child
            table = child
        return table

    def set_user_pte(self, vcpu: Vcpu, mm: MM, va: int, value: int) -> None:
        pt = self._table(vcpu, mm.tables, mm.pgd, va, 1, P | RW | US, self.frames.alloc)
        self.kwrite(vcpu, (pt << 12) + 8 * self._index(va, 1), value)
        self.counters["kernel_pte_writes"] += 1

    def read_user_pte(self, vcpu: Vcpu, mm: MM, va: int) -> int:
        pt = mm.tables.get((1, va >> 21))
        return 0 if pt is None else self.kread(vcpu, (pt << 12) + 8 * self._index(va, 1))

    def set_kernel_pte(self, vcpu: Vcpu | None, va: int, value: int, level: int = 1) -> None:
        t = self._table(vcpu, self.ktables, self.kpgd, va, level, P | RW | G, self.frames.alloc)
        addr = (t << 12) + 8 * self._index(va, level)
        if vcpu is None:
            self.vm.write_phys(addr, value.to_bytes(8, "little"))
        else:
            self.kwrite(vcpu, addr, value)
            self.counters["kernel_pte_writes"] += 1

    # -- boot ------------------------------------------------------------------------------------------
    def boot(self) -> None:
        """Build init_mm, start every vCPU in long mode, map the devices, say hello on the console."""
        if self.booted:
            return
        m = self.machine
        # Frames the kernel image occupies are not for the allocator.
        reserved = set(range(KTEXT_GPA >> 12, (KTEXT_GPA + KTEXT_SIZE) >> 12))
        self.frames.free = [f for f in self.frames.free if f not in reserved]
        self.kpgd = self.frames.alloc()
        self.vm.write_phys(self.kpgd << 12, bytes(PAGE))
        # The direct map of all RAM in 2 MiB pages (the first 2 MiB too: it is never used for MMIO here).
        for start, end in [(0, m.spec.lowmem_end)] + m.ram_ranges()[1:]:
            for gpa in range(start & ~0x1FFFFF, end, 2 << 20):
                self.set_kernel_pte(None, DIRECT_MAP + gpa, gpa | P | RW | PS | G | NX, level=2)
        # The kernel image: text read-only + executable, data writable + NX.
        for off in range(0, KTEXT_SIZE, 2 << 20):
            flags = P | PS | G | (0 if off < KTEXT_SIZE // 2 else RW | NX)
            self.set_kernel_pte(None, KTEXT + off, (KTEXT_GPA + off) | flags, level=2)
        # The vmalloc area's PUD exists from boot, so every PGD shares it (preallocate_vmalloc_pages).
        self._table(None, self.ktables, self.kpgd, VMALLOC, 3, P | RW | G, self.frames.alloc)
        # The fixmap's page table exists from boot too (it sits under the kernel image's PUD).
        self._table(None, self.ktables, self.kpgd, FIXMAP_APIC, 1, P | RW | G, self.frames.alloc)
        for cpu in self.cpus:
            cpu.vcpu.set_sregs(cr0=self.cr0, cr3=self.kpgd << 12, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX, cpl=0)
            cpu.cr3 = self.kpgd
        v0 = self.cpus[0].vcpu
        # Per-process kernel data: slab pages touched on syscalls and faults.
        self.slab = [self.frames.alloc() for _ in range(64)]
        self.ring_page = self.frames.alloc()
        for gfn in (*self.slab[:4], self.ring_page):
            self.clear_page(v0, gfn)
        # Fixmap: local APIC, IOAPIC, HPET (set_fixmap_nocache).
        uc = P | RW | PCD | PWT | G | NX
        self.set_kernel_pte(v0, FIXMAP_APIC, m.lapic.base | uc)
        self.set_kernel_pte(v0, FIXMAP_IOAPIC, m.ioapic.base | uc)
        self.set_kernel_pte(v0, FIXMAP_HPET, m.hpet.base | uc)
        # Drivers probe: ioremap their register BARs.
        for dev in (m.serial, m.net_notify, m.net_cfg, m.blk_notify, m.blk_cfg, m.testdev_user, m.testdev_kernel,
                    *([m.e1000] if m.e1000 is not None else [])):
            self.ioremap(v0, dev.name, dev.base, dev.size)
        if m.spec.framebuffer_mib:
            self.ioremap(v0, "framebuffer", 0xFD000000, m.spec.framebuffer_mib << 20, wc=True)
        # Local APIC and IOAPIC set-up, the console banner.
        for cpu in self.cpus:
            self.apic_init(cpu)
        for pin in range(4):
            self.mmio(v0, FIXMAP_IOAPIC, 4, "write", 0x10 + 2 * pin)
            self.mmio(v0, FIXMAP_IOAPIC + 0x10, 4, "write", 0x30 + pin)
        for ch in b"Linux version 2.6.39-kvmmu (modelled) booting"[:self.p.boot_console_bytes]:
            self.mmio(v0, self.ioremaps["serial"] + 5, 1, "read")
            self.mmio(v0, self.ioremaps["serial"], 1, "write", ch)
        self.booted = True

    def apic_init(self, cpu: Cpu) -> None:
        if self.p.apic != "xapic":
            return
        v = cpu.vcpu
        self.mmio(v, FIXMAP_APIC + 0x30, 4, "read")
        self.mmio(v, FIXMAP_APIC + 0x320, 4, "write", 0x20000 | 0xEC if self.p.timer == "periodic" else 0xEC)
        if self.p.timer != "tsc-deadline":
            self.mmio(v, FIXMAP_APIC + 0x380, 4, "write", 100000)

    def ioremap(self, vcpu: Vcpu, name: str, phys: int, size: int, wc: bool = False) -> int:
        """ioremap(): a fresh range in the vmalloc area (plus a guard page), PTEs written through the vCPU."""
        va = self._vmalloc_next
        npages = (size + PAGE - 1) >> 12
        flags = P | RW | G | NX | (PWT if wc else PCD | PWT)
        for i in range(npages):
            self.set_kernel_pte(vcpu, va + (i << 12), (phys + (i << 12)) | flags)
        self._vmalloc_next = va + ((npages + 1) << 12)
        self.ioremaps[name] = va
        return va

    # -- processes --------------------------------------------------------------------------------------
    def new_file(self, name: str, pages: int) -> File:
        f = File(len(self.files), name, pages)
        self.files.append(f)
        return f

    def _new_mm(self, vcpu: Vcpu) -> MM:
        """pgd_alloc: a zeroed PGD with the kernel's entries copied from init_mm."""
        pgd = self.frames.alloc()
        self.clear_page(vcpu, pgd)
        for slot in KERNEL_PGD_SLOTS:
            entry = self.vm.read_guest_quiet((self.kpgd << 12) + 8 * slot, 8)
            self.kwrite(vcpu, (pgd << 12) + 8 * slot, entry)
        mm = self.mms[pgd] = MM(pgd)
        return mm

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

    def _enqueue(self, proc: Process, now: int | None, src: Cpu | None = None) -> None:
        """Make proc runnable (try_to_wake_up); an idle CPU that should run it gets a reschedule IPI."""
        proc.state = "runnable"
        if proc.pin is not None:
            cpu = self.cpus[proc.pin]
            cpu.runqueue.append(proc)
            if now is not None and cpu.idle:
                self._kick_cpu(cpu, now, src)
            return
        self.global_rq.append(proc)
        if now is not None:
            for cpu in self.cpus:
                if cpu.idle and not cpu.runqueue:
                    self._kick_cpu(cpu, now, src)
                    break

    def _kick_cpu(self, cpu: Cpu, now: int, src: Cpu | None) -> None:
        if src is not None and src is not cpu:
            self.send_ipi(src, cpu)
        cpu.idle = False
        self.wake_requests.append((cpu.index, now))

    def send_ipi(self, src: Cpu, dst: Cpu) -> None:
        """A reschedule IPI: two ICR writes to the local APIC (xAPIC MMIO; an MSR with x2APIC)."""
        self.counters["ipis"] += 1
        if self.p.apic == "xapic":
            self.mmio(src.vcpu, FIXMAP_APIC + 0x310, 4, "write", dst.index << 24)
            self.mmio(src.vcpu, FIXMAP_APIC + 0x300, 4, "write", 0xFD)

    # -- the page-fault handler ---------------------------------------------------------------------------
    def page_fault(self, cpu: Cpu, proc: Process, fault: GuestFault, now: int) -> str:
        """do_page_fault: 'fixed' (retry the access), 'blocked' (waiting for I/O) or 'segv'."""
        vcpu = cpu.vcpu
        mm = proc.mm
        va = fault.cr2
        ec = fault.error_code
        self.counters["page_faults"] += 1
        proc.stats["faults"] += 1
        self._charge(cpu, self.p.cost_fault)
        vma = mm.find_vma(va) if mm is not None else None
        write, fetch = bool(ec & PF_WRITE), bool(ec & PF_FETCH)
        if vma is None or (write and not vma.writable) or (fetch and not vma.executable):
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
                idx = vma.file_page + ((base - vma.start) >> 12)
                cached = self.page_cache.get((vma.file.fid, idx))
                if cached is None:
                    self._page_cache_fill(cpu, proc, vma.file, [idx], now)
                    return "blocked"
                self.page_cache.move_to_end((vma.file.fid, idx))
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

    # -- page cache and block I/O ------------------------------------------------------------------------
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

    def disk_request(self, cpu: Cpu, now: int, waiter: Process | None, latency_us: float = 100.0) -> None:
        """virtio-blk: a descriptor in the ring, a doorbell write; the completion interrupt wakes `waiter`."""
        vcpu = cpu.vcpu
        self.counters["disk_requests"] += 1
        self.kwrite(vcpu, (self.ring_page << 12) + 8 * (self.counters["disk_requests"] % 256), now & 0xFFFFFFFF)
        self.mmio(vcpu, self.ioremaps["virtio-blk-notify"], 2, "write", 0)
        if waiter is not None:
            waiter.state = "blocked"
        self.at(cpu, now + self.p.cycles(latency_us * 1e-6), lambda c, t: self._blk_irq(c, t, waiter))

    def _blk_irq(self, cpu: Cpu, now: int, waiter: Process | None) -> int:
        vcpu = cpu.vcpu
        self.counters["irqs"] += 1
        if not self.machine.spec.msix:
            self.mmio(vcpu, self.ioremaps["virtio-blk-cfg"] + 0x800, 1, "read")
        self.kread(vcpu, (self.ring_page << 12) + 0x800)
        self.eoi(cpu)
        if waiter is not None and waiter.state == "blocked":
            self._enqueue(waiter, now, cpu)
        return self.p.cost_irq

    def eoi(self, cpu: Cpu) -> None:
        if self.p.apic == "xapic":
            self.mmio(cpu.vcpu, FIXMAP_APIC + 0xB0, 4, "write", 0)

    def at(self, cpu: Cpu, when: int, fn: Callable[[Cpu, int], int]) -> None:
        """Schedule `fn` (an interrupt) on `cpu` at time `when`; it returns the native cycles it used."""
        self._seq += 1
        heapq.heappush(cpu.events, (when, self._seq, fn))
        if cpu.idle:
            cpu.idle = False
            self.wake_requests.append((cpu.index, when))

    def vmm_at(self, when: int, fn: Callable[[int], None]) -> None:
        """Schedule work of the VMM's own threads (display refresh, hotplug) at host time `when`."""
        self._seq += 1
        heapq.heappush(self.vmm_timers, (when, self._seq, fn))

    # -- fork / exec / exit / munmap --------------------------------------------------------------------
    def do_fork(self, cpu: Cpu, parent: Process, program: Program, name: str | None = None) -> Process:
        vcpu = cpu.vcpu
        self.counters["forks"] += 1
        self._charge(cpu, self.p.cost_fork)
        mm = self._new_mm(vcpu)
        pmm = parent.mm
        mm.vmas = [Vma(v.start, v.end, v.pte_flags, v.kind, v.file, v.file_page, v.private) for v in pmm.vmas]
        mm.brk, mm.mmap_next = pmm.brk, pmm.mmap_next
        wrprotected = False
        for vpn in sorted(pmm.pages):
            page = pmm.pages[vpn]
            va = vpn << 12
            pte = self.read_user_pte(vcpu, pmm, va)                  # copy_pte_range reads the parent's PTE
            vma = pmm.find_vma(va)
            if vma.private and vma.writable and page.writable:
                pte &= ~RW
                self.set_user_pte(vcpu, pmm, va, pte)                 # ptep_set_wrprotect
                page.writable, page.cow = False, True
                wrprotected = True
            elif vma.private and vma.writable:
                page.cow = True
            self.frames.get(page.gfn)
            mm.pages[vpn] = UserPage(page.gfn, page.writable, page.cow)
            self.set_user_pte(vcpu, mm, va, pte & ~(1 << 5 | 1 << 6))   # the child's PTE, A/D clear
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

    def flush_tlb_mm(self, cpu: Cpu, mm: MM) -> None:
        """flush_tlb_mm on the CPU running it: reload CR3 (no PCID)."""
        self.counters["tlb_flushes"] += 1
        if cpu.cr3 == mm.pgd:
            cpu.vcpu.write_cr3(mm.pgd << 12)

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
        mm = proc.mm
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
        mm = proc.mm
        start = mm.mmap_next
        mm.mmap_next += (npages + 1) << 12
        flags = P | US | NX | (RW if writable else 0)
        mm.vmas.append(Vma(start, start + (npages << 12), flags, "file" if file else "anon", file, file_page,
                           private=True))
        return start

    def do_brk(self, proc: Process, npages: int) -> int:
        mm = proc.mm
        heap = next(v for v in mm.vmas if v.start == USER_HEAP)
        old = heap.end
        heap.end += npages << 12
        mm.brk = heap.end
        return old

    # -- scheduling --------------------------------------------------------------------------------------
    def _switch_mm(self, cpu: Cpu, mm: MM | None) -> None:
        target = mm.pgd if mm is not None else self.kpgd
        if cpu.cr3 == target:
            return
        old = cpu.cr3
        cpu.vcpu.write_cr3(target << 12)
        cpu.cr3 = target
        self._mm_unloaded(cpu, old)
        if mm is not None:
            mm.loaded_on.add(cpu.index)

    def _mm_unloaded(self, cpu: Cpu, old_pgd: int) -> None:
        mm = self.mms.get(old_pgd)
        if mm is not None:
            mm.loaded_on.discard(cpu.index)
            if mm.dead and not mm.loaded_on:
                self._free_pgd(mm)

    def schedule(self, cpu: Cpu, now: int) -> Process | None:
        prev = cpu.current
        if prev is not None and prev.state == "running":
            prev.state = "runnable"
            (cpu.runqueue if prev.pin is not None else self.global_rq).append(prev)
        nxt = None
        for q in (cpu.runqueue, self.global_rq):
            while q:
                cand = q.popleft()
                if cand.state == "runnable" and cand.pid in self.procs:
                    nxt = cand
                    break
            if nxt is not None:
                break
        cpu.need_resched = False
        cpu.slice_ticks = self.p.timeslice_ticks
        if nxt is None:
            cpu.current = None
            return None
        if nxt is not prev:
            self.counters["context_switches"] += 1
            self._charge(cpu, self.p.cost_ctxsw)
            self.kwrite(cpu.vcpu, (nxt.kstack << 12) + 0xF00, nxt.pid)       # switch_to: the new kernel stack
            if nxt.mm is not None:
                self._switch_mm(cpu, nxt.mm)
        nxt.state = "running"
        cpu.current = nxt
        return nxt

    # -- running a vCPU ----------------------------------------------------------------------------------
    def _charge(self, cpu: Cpu, cycles: int) -> None:
        cpu.clock += cycles
        self.counters["native_cycles"] += cycles

    def _account(self, cpu: Cpu) -> None:
        """Advance the CPU's clock by what the cost model charges for what KVM did since last time."""
        v = cpu.vcpu
        exits = v.stats["exits"]
        walks = v.counters["hw_walks"]
        if exits == cpu.last_exits and walks == cpu.last_walks:
            return
        cpu.last_exits, cpu.last_walks = exits, walks
        c = self._vcpu_cost(v)
        cpu.clock += c - cpu.last_cost
        cpu.last_cost = c
        vc = self._vm_cost(self.vm)
        cpu.clock += vc - self.vm_last_cost
        self.vm_last_cost = vc

    def timer_tick(self, cpu: Cpu) -> None:
        self.counters["ticks"] += 1
        self.counters["irqs"] += 1
        self._charge(cpu, self.p.cost_irq)
        if self.p.clocksource == "hpet":
            self.mmio(cpu.vcpu, FIXMAP_HPET + 0xF0, 8, "read")
        if self.p.timer == "oneshot" and self.p.apic == "xapic":
            self.mmio(cpu.vcpu, FIXMAP_APIC + 0x380, 4, "write", 100000)
        self.eoi(cpu)
        cpu.slice_ticks -= 1
        if cpu.slice_ticks <= 0 and (cpu.runqueue or self.global_rq):
            cpu.need_resched = True

    def run_slice(self, cpu: Cpu, start: int, budget: int) -> tuple[int, int | None]:
        """Run this vCPU from host time `start` for at most `budget` cycles.

        Returns (cycles used, when it wants to run next: a time, or None when it sleeps until woken).
        """
        cpu.clock = start
        end = start + budget
        if not cpu.ticking:
            cpu.ticking = True
            if cpu.next_tick == 0:
                cpu.next_tick = start + self.tick_period
            elif cpu.next_tick <= start:
                # NO_HZ idle exit (tick_nohz_restart): the tick timer is forwarded on its own grid
                # (last_tick + k * TICK_NSEC) to the first expiry after now, not re-armed a whole
                # period from now, so a vCPU that idles more often than once a period still ticks.
                cpu.next_tick += ((start - cpu.next_tick) // self.tick_period + 1) * self.tick_period
        self.vm.trace.current_vcpu = cpu.vcpu.id
        while cpu.clock < end:
            now = cpu.clock
            # Interrupts first: due device completions, then the timer (missed ticks are coalesced).
            while cpu.events and cpu.events[0][0] <= now:
                _, _, fn = heapq.heappop(cpu.events)
                self._charge(cpu, fn(cpu, cpu.clock))
                self._account(cpu)
            if cpu.ticking and cpu.clock >= cpu.next_tick:
                missed = (cpu.clock - cpu.next_tick) // self.tick_period
                self.counters["lost_ticks"] += missed
                cpu.next_tick += (missed + 1) * self.tick_period
                self.timer_tick(cpu)
                self._account(cpu)
            proc = cpu.current
            if proc is None or proc.state != "running" or cpu.need_resched:
                proc = self.schedule(cpu, cpu.clock)
                self._account(cpu)
                if proc is None:
                    cpu.idle = True
                    cpu.ticking = False          # NO_HZ idle: no ticks while idle (next_tick keeps the grid)
                    wake = cpu.events[0][0] if cpu.events else None
                    return max(1, cpu.clock - start), wake
            self._step(cpu, proc, end)
            self._account(cpu)
        return cpu.clock - start, cpu.clock

    def _step(self, cpu: Cpu, proc: Process, end: int) -> None:
        """Execute (part of) the process's current operation."""
        if proc.pending is None:
            try:
                op = proc.program.send(proc.reply) if proc.started else next(proc.program)
            except StopIteration:
                op = ("exit",)
            proc.started = True
            proc.reply = None
            proc.pending = op
            proc.stats["ops"] += 1
            if op[0] == "compute":
                proc.compute_left = int(op[1])
        op = proc.pending
        kind = op[0]
        handler = self._ops.get(kind)
        if handler is None:
            raise GuestPanic(f"process {proc.name}[{proc.pid}]: unknown operation {op!r}")
        done, reply = handler(self, cpu, proc, op, end)
        if done:
            proc.pending = None
            proc.reply = reply

    # -- operations a program can yield -------------------------------------------------------------------
    def _op_compute(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        limit = min(end, cpu.next_tick if cpu.ticking else end, cpu.events[0][0] if cpu.events else end)
        run = max(1, min(proc.compute_left, limit - cpu.clock))
        self._charge(cpu, run)
        proc.compute_left -= run
        return proc.compute_left <= 0, None

    def _user_access(self, cpu: Cpu, proc: Process, gva: int, size: int, kind: str, value: int | None,
                     cpl: int) -> tuple[bool, Any]:
        vcpu = cpu.vcpu
        for _ in range(4):
            r = vcpu.access(gva, size, kind, value, cpl=cpl)
            if r.fault is None:
                return True, r.value
            if r.fault.vector != 14:
                raise GuestPanic(f"{proc.name}[{proc.pid}]: exception {r.fault} at {gva:#x}")
            self._account(cpu)
            res = self.page_fault(cpu, proc, r.fault, cpu.clock)
            if res == "blocked":
                return False, None
            if res == "segv":
                self.do_exit(cpu, proc, cpu.clock)
                return True, None
        raise GuestPanic(f"{proc.name}[{proc.pid}]: access to {gva:#x} faulted repeatedly")

    def _op_access(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        # ("access", gva, size, kind[, value])
        return self._user_access(cpu, proc, op[1], op[2], op[3], op[4] if len(op) > 4 else None, 3)

    def _op_kaccess(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        # ("kaccess", gva, size, kind[, value]): a CPL0 access: a kernel address (a driver's register
        # through ioremap / the fixmap, or kernel memory) or a user address (copy_to/from_user)
        gva, size, kind = op[1], op[2], op[3]
        value = op[4] if len(op) > 4 else None
        if gva < 1 << 47:
            return self._user_access(cpu, proc, gva, size, kind, value, 0)
        fb = self.ioremaps.get("framebuffer")
        in_fb = fb is not None and fb <= gva < fb + (self.machine.spec.framebuffer_mib << 20)
        if (VMALLOC <= gva < VMALLOC + (1 << 39) or gva >= FIXMAP_HPET) and not in_fb:   # the framebuffer is RAM
            return True, self.mmio(cpu.vcpu, gva, size, kind, value)
        r = cpu.vcpu.access(gva, size, kind, value, cpl=0)
        if r.fault is not None:
            raise GuestPanic(f"kernel access at {gva:#x} faulted: {r.fault}")
        return True, r.value

    def _op_mmap(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        self._charge(cpu, self.p.cost_syscall)
        return True, self.do_mmap(proc, op[1], op[2] if len(op) > 2 else True)

    def _op_munmap(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        self._charge(cpu, self.p.cost_syscall)
        self.do_munmap(cpu, proc, op[1], op[2])
        return True, None

    def _op_brk(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        self._charge(cpu, self.p.cost_syscall)
        return True, self.do_brk(proc, op[1])

    def _op_fork(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        # ("fork", child_program[, name])
        child = self.do_fork(cpu, proc, op[1], op[2] if len(op) > 2 else None)
        return True, child.pid

    def _op_exec(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        self.do_exec(cpu, proc, op[1])
        return True, None

    def _op_exit(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        self.do_exit(cpu, proc, cpu.clock)
        return True, None

    def _op_wait(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        """wait(): reap one exited child, or sleep until one exits; False if there are no children."""
        self._charge(cpu, self.p.cost_syscall)
        if proc.zombies:
            proc.zombies -= 1
            return True, True
        if not proc.children:
            return True, False
        proc.state = "blocked"
        proc.waiting_child = True
        return False, None

    def _op_read_file(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        # ("read_file", file, first_page, npages, user_buffer): page cache (disk on a miss) -> user copy
        file, first, n, buf = op[1], op[2], op[3], op[4]
        self._charge(cpu, self.p.cost_syscall)
        missing = [i for i in range(first, first + n) if (file.fid, i) not in self.page_cache]
        if missing:
            self._page_cache_fill(cpu, proc, file, missing, cpu.clock)
            return False, None
        vcpu = cpu.vcpu
        for k, i in enumerate(range(first, first + n)):
            gfn = self.page_cache[(file.fid, i)]
            self.page_cache.move_to_end((file.fid, i))
            self.kread(vcpu, gfn << 12)
            ok, _ = self._user_access(cpu, proc, buf + (k << 12), 8, "write", i, 0)    # copy_to_user
            if not ok:
                return False, None
            if proc.state == "zombie":
                return True, None
        return True, n

    def _op_write_file(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        # ("write_file", file, first_page, npages, user_buffer): copy_from_user into new page-cache pages
        file, first, n, buf = op[1], op[2], op[3], op[4]
        self._charge(cpu, self.p.cost_syscall)
        vcpu = cpu.vcpu
        self._reclaim_if_low(cpu)
        for k, i in enumerate(range(first, first + n)):
            ok, _ = self._user_access(cpu, proc, buf + (k << 12), 8, "read", None, 0)
            if not ok:
                return False, None
            key = (file.fid, i)
            gfn = self.page_cache.get(key)
            if gfn is None:
                gfn = self.frames.alloc()
                self.page_cache[key] = gfn
            self.kwrite(vcpu, gfn << 12, i)
        self.disk_request(cpu, cpu.clock, None)          # writeback, asynchronous
        return True, n

    def _op_sleep(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        # ("sleep", cycles): block, and be woken by a timer on this CPU
        if proc.sleeping:
            proc.sleeping = False
            return True, None
        proc.state = "blocked"
        proc.sleeping = True

        def wake(c: Cpu, t: int) -> int:
            if proc.state == "blocked":
                self._enqueue(proc, t, c)
            return 0
        self.at(cpu, cpu.clock + int(op[1]), wake)
        return False, None

    def _op_call(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        """("call", fn, *args): a workload's kernel routine fn(os, cpu, proc, *args) -> (done, reply)."""
        return op[1](self, cpu, proc, *op[2:])

    _ops: dict[str, Callable] = {
        "compute": _op_compute, "access": _op_access, "kaccess": _op_kaccess, "mmap": _op_mmap,
        "munmap": _op_munmap, "brk": _op_brk, "fork": _op_fork, "exec": _op_exec, "exit": _op_exit,
        "wait": _op_wait, "read_file": _op_read_file, "write_file": _op_write_file, "sleep": _op_sleep,
        "call": _op_call,
    }

    # -- reporting --------------------------------------------------------------------------------------
    def summary(self) -> dict[str, int]:
        out = dict(self.counters)
        out["processes_alive"] = len(self.procs)
        out["free_frames"] = self.frames.nr_free
        out["page_cache_pages"] = len(self.page_cache)
        return out
