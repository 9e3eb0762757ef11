"""Workloads for the modelled guest OS, each a set of processes with parameters.

- `kernel-compile`: `make -j N` forking compiler jobs: fork + exec + demand faults on text, data,
  heap and stack, file reads through the page cache (disk I/O on a miss), an mmap/munmap or two,
  an object file written, exit.  Many short processes, heavy faults and context switches, few MMIO
  accesses (disk doorbells, timer EOIs).
- `netperf-rr`: one request/response stream per vCPU, like netperf TCP_RR over virtio-net (or
  e1000): per transaction the driver rings the TX doorbell, the reply arrives `rtt_us` later as an
  interrupt (ISR read without MSI-X, EOI), the process copies it out and goes again.
- `mmio-bench`: like kvm-unit-tests `vmexit` mmio: a kernel thread hammering one device register
  (in userspace: pci-testdev; in the kernel: an ioeventfd or the local APIC).
- `memslot-churn`: a driver loop (RAM, doorbell, status register, framebuffer) while the VMM
  hot-plugs memory, deletes it again, toggles dirty logging and refreshes the display.

A workload's numbers (`result()`) are guest-level: jobs finished, transactions, iterations.  The
time they took is modelled host time; the counters KVM moved are in the scenario's report.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InvalidArgument
from ..kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES
from .os import DIRECT_MAP, FIXMAP_APIC, USER_DATA, USER_HEAP, USER_STACK_TOP, USER_TEXT, GuestPanic, Image, Program

if TYPE_CHECKING:
    from .os import Cpu, GuestOS, Process


INT_RANGE = (0, 10**9)                 # a count parameter without a range of its own
FLOAT_RANGE = (0.0, 1e9)


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidArgument(f"workload.{name}", value, f"an integer from {lo:,} to {hi:,}")


def _check_num(name: str, value: Any, lo: float, hi: float) -> None:
    # NaN passes neither comparison, so it is refused with infinities and out-of-range values.
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise InvalidArgument(f"workload.{name}", value, f"a finite number from {lo:g} to {hi:g}")


@dataclass
class Workload:
    kind: ClassVar[str] = ""
    # parameter -> (lo, hi): its stated range (docs/cli.md); others: INT_RANGE / FLOAT_RANGE
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {}

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(f.default, bool):
                if not isinstance(v, bool):
                    raise InvalidArgument(f"workload.{f.name}", v, "must be true or false")
            elif isinstance(f.default, int):
                lo, hi = self.RANGES.get(f.name, INT_RANGE)
                _check_int(f.name, v, int(lo), int(hi))
            elif isinstance(f.default, float):
                lo, hi = self.RANGES.get(f.name, FLOAT_RANGE)
                _check_num(f.name, v, lo, hi)
            elif isinstance(f.default, str) and not isinstance(v, str):
                raise InvalidArgument(f"workload.{f.name}", v, "must be a string")

    def setup(self, os_: GuestOS) -> None:
        raise NotImplementedError

    def result(self, os_: GuestOS) -> dict[str, Any]:
        return {}


# -- kernel compile ---------------------------------------------------------------------------------
@dataclass
class KernelCompile(Workload):
    """make -j`jobs` of short compiler processes (0 jobs: two per vCPU)."""

    kind: ClassVar[str] = "kernel-compile"
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "jobs": (0, 4096), "total_jobs": (0, 10**7), "mmaps": (0, 1024), "compute_ms": (0, 1e5),
        "reaccess": (0, 1000),
        **{f"{n}_pages": (0, 1 << 20) for n in ("make", "text", "data", "bss", "heap", "stack", "src", "header", "obj",
                                                 "mmap")}}
    jobs: int = 0
    total_jobs: int = 0                 # stop after this many (0: run for the scenario's duration)
    make_pages: int = 32                # make's own pages, copied at every fork
    text_pages: int = 48                # compiler text pages a job touches (of a 1024-page binary)
    data_pages: int = 4
    bss_pages: int = 4
    heap_pages: int = 96                # anonymous memory a job touches (demand faults)
    stack_pages: int = 4
    src_pages: int = 2                  # a fresh source file per job (disk read)
    header_pages: int = 16              # shared headers (page-cache hits after the first reads)
    obj_pages: int = 2                  # object file written
    mmaps: int = 1                      # anonymous mmap + touch + munmap per job
    mmap_pages: int = 16
    compute_ms: float = 20.0            # native compute per job
    reaccess: int = 2                   # extra accesses per touched page (TLB hits)

    def setup(self, os_: GuestOS) -> None:
        self.validate()
        self.done_jobs = 0
        self.started = 0
        ncpu = len(os_.cpus)
        jobs = self.jobs or 2 * ncpu
        self.cc1 = os_.new_file("cc1", 1024 + self.data_pages)
        self.headers = os_.new_file("include", 4096)
        self.make_img = Image("make", os_.new_file("make", 64 + 8), 16, 4, 8, 4)
        rng = random.Random(f"kvmmu-kcompile:{os_.rng.random()}")
        os_.spawn("make", self._make(os_, rng, jobs), image=self.make_img)

    def _make(self, os_: GuestOS, rng: random.Random, jobs: int) -> Program:
        yield ("brk", self.make_pages)
        for i in range(self.make_pages):
            yield ("access", USER_HEAP + (i << 12), 8, "write", i)
        running = 0
        while True:
            while running < jobs and (not self.total_jobs or self.started < self.total_jobs):
                self.started += 1
                yield ("compute", os_.p.cycles(50e-6))          # make decides what to build
                yield ("access", USER_HEAP + (rng.randrange(self.make_pages) << 12), 8, "write", self.started)
                yield ("fork", self._job(os_, random.Random(rng.random()), self.started), "sh")
                running += 1
            if running == 0:
                break
            reaped = yield ("wait",)
            if reaped:
                running -= 1
                self.done_jobs += 1
        os_.done = True
        yield ("exit",)

    def _job(self, os_: GuestOS, rng: random.Random, n: int) -> Program:
        img = Image("cc1", self.cc1, 1024, self.data_pages, self.bss_pages, self.stack_pages)
        yield ("exec", img)
        chunks = 4
        compute = os_.p.cycles(self.compute_ms * 1e-3) // chunks
        text0 = rng.randrange(0, 1024 - self.text_pages)
        stack = USER_STACK_TOP - (self.stack_pages << 12)
        for i in range(self.stack_pages):
            yield ("access", stack + (i << 12), 8, "write", i)
        for i in range(self.text_pages):
            yield ("access", USER_TEXT + ((text0 + i) << 12), 8, "fetch")
        for i in range(self.data_pages):
            yield ("access", USER_DATA + (i << 12), 8, "read") if i % 2 else \
                ("access", USER_DATA + (i << 12), 8, "write", i)
        heap = yield ("brk", self.heap_pages)
        buf = USER_STACK_TOP - (self.stack_pages << 12)
        src = os_.new_file(f"src{n}.c", self.src_pages) if self.src_pages else None
        if src is not None:
            yield ("read_file", src, 0, self.src_pages, heap)
        for k in range(0, self.header_pages, 4):
            first = rng.randrange(0, self.headers.pages - 4)
            yield ("read_file", self.headers, first, min(4, self.header_pages - k), heap)
        per_chunk = max(1, self.heap_pages // chunks)
        for c in range(chunks):
            for i in range(c * per_chunk, min(self.heap_pages, (c + 1) * per_chunk)):
                yield ("access", heap + (i << 12), 8, "write", i)
            for _ in range(self.reaccess * per_chunk):
                yield ("access", heap + (rng.randrange(self.heap_pages) << 12) + 8 * rng.randrange(512), 8, "read")
                yield ("access", USER_TEXT + ((text0 + rng.randrange(self.text_pages)) << 12), 8, "fetch")
            if c < self.mmaps:
                start = yield ("mmap", self.mmap_pages)
                for i in range(self.mmap_pages):
                    yield ("access", start + (i << 12), 8, "write", i)
                yield ("munmap", start, self.mmap_pages)
            yield ("compute", compute)
        if self.obj_pages:
            obj = os_.new_file(f"obj{n}.o", self.obj_pages)
            yield ("write_file", obj, 0, self.obj_pages, heap)
        del buf
        yield ("exit",)

    def result(self, os_: GuestOS) -> dict[str, Any]:
        return {"jobs_finished": self.done_jobs, "jobs_started": self.started}


# -- netperf TCP_RR ----------------------------------------------------------------------------------
@dataclass
class NetperfRR(Workload):
    """Request/response streams (0 streams: one per vCPU, each pinned to its vCPU)."""

    kind: ClassVar[str] = "netperf-rr"
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {"streams": (0, 4096), "rtt_us": (0, 1e7), "stack_us": (0, 1e7)}
    streams: int = 0
    transactions: int = 0          # per stream (0: run for the scenario's duration)
    rtt_us: float = 50.0           # wire + peer time from the doorbell to the reply interrupt
    stack_us: float = 10.0         # native TCP/IP + netperf work per transaction in the guest

    def setup(self, os_: GuestOS) -> None:
        self.validate()
        n = self.streams or len(os_.cpus)
        self.count = [0] * n
        self.finished = 0
        self.n = n
        for s in range(n):
            os_.spawn(f"netperf{s}", self._stream(os_, s), pin=s % len(os_.cpus))

    def _stream(self, os_: GuestOS, s: int) -> Program:
        buf = yield ("mmap", 1)
        yield ("access", buf, 8, "write", 0)
        stack = os_.p.cycles(self.stack_us * 1e-6)
        i = 0
        while not self.transactions or i < self.transactions:
            yield ("compute", stack)
            yield ("call", net_request, buf, self.rtt_us)      # send(): copy, ring, doorbell; sleep for the reply
            yield ("kaccess", buf, 8, "write", i)              # recv(): copy_to_user
            i += 1
            self.count[s] = i
        self.finished += 1
        if self.finished == self.n:
            os_.done = True
        yield ("exit",)

    def result(self, os_: GuestOS) -> dict[str, Any]:
        return {"transactions": sum(self.count), "streams": self.n}


def net_request(os_: GuestOS, cpu: Cpu, proc: Process, buf: int, rtt_us: float) -> tuple[bool, Any]:
    """The kernel side of one request: TX (copy from user, descriptor, doorbell), then sleep until the
    RX interrupt wakes us (the interrupt handler runs on this CPU when the reply arrives)."""
    if proc.sleeping:
        proc.sleeping = False
        return True, None
    vcpu = cpu.vcpu
    ok, _ = os_._user_access(cpu, proc, buf, 8, "read", None, 0)          # copy_from_user
    if not ok:
        return False, None
    os_.counters["net_requests"] += 1
    os_.kwrite(vcpu, (os_.ring_page << 12) + 0x400 + 8 * (os_.counters["net_requests"] % 64), 1)
    m = os_.machine
    if m.e1000 is not None:
        os_.mmio(vcpu, os_.ioremaps["e1000"] + 0x3818, 4, "write", os_.counters["net_requests"] & 0xFF)   # TDT
    else:
        os_.mmio(vcpu, os_.ioremaps["virtio-net-notify"], 2, "write", 1)
    proc.state = "blocked"
    proc.sleeping = True
    os_.at(cpu, cpu.clock + os_.p.cycles(rtt_us * 1e-6), lambda c, t: _net_rx_irq(os_, c, t, proc))
    return False, None


def _net_rx_irq(os_: GuestOS, cpu: Cpu, now: int, waiter: Process) -> int:
    vcpu = cpu.vcpu
    m = os_.machine
    os_.counters["irqs"] += 1
    if m.e1000 is not None:
        base = os_.ioremaps["e1000"]
        os_.mmio(vcpu, base + 0xC0, 4, "read")              # ICR: why did it interrupt (and ack)
        os_.mmio(vcpu, base + 0xD8, 4, "write", 0xFFFF)     # IMC: mask while NAPI polls
        os_.kread(vcpu, (os_.ring_page << 12) + 0x600)
        os_.mmio(vcpu, base + 0x2818, 4, "write", 1)        # RDT: give the buffer back
        os_.mmio(vcpu, base + 0xD0, 4, "write", 0x9D)       # IMS: unmask
    else:
        if not m.spec.msix:
            os_.mmio(vcpu, os_.ioremaps["virtio-net-cfg"] + 0x800, 1, "read")      # ISR
        os_.kread(vcpu, (os_.ring_page << 12) + 0x600)                             # the used ring
    os_.eoi(cpu)
    if waiter.state == "blocked":
        os_._enqueue(waiter, now, cpu)
    return os_.p.cost_irq


# -- MMIO microbenchmark --------------------------------------------------------------------------------
@dataclass
class MmioBench(Workload):
    """kvm-unit-tests vmexit mmio: `iterations` accesses to one register, on every vCPU."""

    kind: ClassVar[str] = "mmio-bench"
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {"size": (1, 8)}
    target: str = "userspace"      # userspace (pci-testdev) | ioeventfd (pci-testdev with an ioeventfd) | lapic
    access: str = "write"          # read | write
    size: int = 4
    iterations: int = 10000
    loop_cycles: int = 20          # native cost of the loop around the access

    def validate(self) -> None:
        super().validate()
        if self.target not in ("userspace", "ioeventfd", "lapic"):
            raise InvalidArgument("workload.target", self.target, "'userspace', 'ioeventfd' or 'lapic'")
        if self.access not in ("read", "write"):
            raise InvalidArgument("workload.access", self.access, "'read' or 'write'")
        if self.size not in (1, 2, 4, 8):
            raise InvalidArgument("workload.size", self.size, "1, 2, 4 or 8 bytes")
        if self.target == "ioeventfd" and self.access == "read":
            raise InvalidArgument("workload.access", self.access, "an ioeventfd only completes writes: use write")

    def setup(self, os_: GuestOS) -> None:
        self.validate()
        self.finished = 0
        self.done_iterations = 0
        self.cycles: list[int] = []
        gva = {"userspace": os_.ioremaps["pci-testdev"], "ioeventfd": os_.ioremaps["pci-testdev-ioeventfd"],
               "lapic": FIXMAP_APIC + (0x80 if self.access == "write" else 0x30)}[self.target]
        for c in range(len(os_.cpus)):
            os_.spawn(f"vmexit{c}", self._loop(os_, gva, c), pin=c, kernel_thread=True)

    def _loop(self, os_: GuestOS, gva: int, c: int) -> Program:
        cpu = os_.cpus[c]
        start = None
        for i in range(self.iterations):
            if start is None:
                start = cpu.clock
            yield ("compute", self.loop_cycles)
            yield ("kaccess", gva, self.size, self.access, *((i & 0xFF,) if self.access == "write" else ()))
            self.done_iterations += 1
        self.cycles.append(cpu.clock - (start or 0))
        self.finished += 1
        if self.finished == len(os_.cpus):
            os_.done = True
        yield ("exit",)

    def result(self, os_: GuestOS) -> dict[str, Any]:
        per = [c / self.iterations for c in self.cycles] if self.iterations else []
        return {"iterations": self.done_iterations,
                "cycles_per_iteration": round(sum(per) / len(per), 1) if per else None}


# -- memslot churn ------------------------------------------------------------------------------------
@dataclass
class MemslotChurn(Workload):
    """A driver loop on every vCPU while the VMM changes memslots every `period_us`."""

    kind: ClassVar[str] = "memslot-churn"
    # A period below 10 us (or a display above 1 kHz) would reschedule the VMM's timer every few cycles.
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "period_us": (10, 1e7), "hotplug_mib": (1, 1 << 20), "display_hz": (0, 1000), "ram_pages": (1, 1 << 20)}
    period_us: float = 2000.0
    actions: str = "hotplug,dirty-log"     # any of hotplug, dirty-log, move
    hotplug_mib: int = 16
    display_hz: int = 30
    iterations: int = 0                    # per vCPU (0: run for the scenario's duration)
    ram_pages: int = 64

    def validate(self) -> None:
        super().validate()
        acts = [a.strip() for a in self.actions.split(",") if a.strip()]
        for a in acts:
            if a not in ("hotplug", "dirty-log", "move"):
                raise InvalidArgument("workload.actions", self.actions, "a comma list of hotplug, dirty-log, move")
        if not acts:
            raise InvalidArgument("workload.actions", self.actions, "name at least one action")

    def setup(self, os_: GuestOS) -> None:
        self.validate()
        self.changes = 0
        self.loops = 0
        self.finished = 0
        self._acts = [a.strip() for a in self.actions.split(",") if a.strip()]
        self._plugged = False
        self._moved = False
        self._step = 0
        period = os_.p.cycles(self.period_us * 1e-6)
        os_.vmm_at(period, lambda t: self._vmm_change(os_, t, period))
        if self.display_hz and os_.machine.spec.framebuffer_mib:
            dperiod = os_.p.cycles(1 / self.display_hz)
            os_.vmm_at(dperiod, lambda t: self._refresh(os_, t, dperiod))
        pages = [os_.frames.alloc() for _ in range(self.ram_pages)]
        for c in range(len(os_.cpus)):
            os_.spawn(f"driver{c}", self._loop(os_, pages, c), pin=c, kernel_thread=True)

    def _vmm_change(self, os_: GuestOS, t: int, period: int) -> None:
        FIRST_FREE_SLOT, SLOT_FB = os_.machine.first_free_slot, os_.machine.fb_slot   # noqa: N806
        vm = os_.vm
        act = self._acts[self._step % len(self._acts)]
        self._step += 1
        self.changes += 1
        size = self.hotplug_mib << 20
        if act == "hotplug":
            base = 1 << 36
            if self._plugged:
                vm.set_user_memory_region(slot=FIRST_FREE_SLOT, guest_phys_addr=base, memory_size=0)
            else:
                vm.set_user_memory_region(slot=FIRST_FREE_SLOT, guest_phys_addr=base, memory_size=size)
            self._plugged = not self._plugged
        elif act == "move":
            base = (1 << 36) + (size if self._moved else 0)
            if vm.memslots.slot(FIRST_FREE_SLOT + 1) is None:
                vm.set_user_memory_region(slot=FIRST_FREE_SLOT + 1, guest_phys_addr=base, memory_size=size)
            else:
                vm.set_user_memory_region(slot=FIRST_FREE_SLOT + 1, guest_phys_addr=base, memory_size=size)
            self._moved = not self._moved
        elif act == "dirty-log" and os_.machine.spec.framebuffer_mib:
            slot = vm.memslots.slot(SLOT_FB)
            if slot is None:
                raise GuestPanic(f"{self.kind}: the framebuffer's memslot {SLOT_FB} is gone")
            vm.set_user_memory_region(slot=SLOT_FB, guest_phys_addr=slot.base_gfn << 12,
                                      memory_size=slot.npages << 12, flags=slot.flags ^ KVM_MEM_LOG_DIRTY_PAGES)
        if not os_.done:
            os_.vmm_at(t + period, lambda t2: self._vmm_change(os_, t2, period))

    def _refresh(self, os_: GuestOS, t: int, period: int) -> None:
        slot = os_.vm.memslots.slot(os_.machine.fb_slot)
        if slot is not None and slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            os_.machine.refresh_display()
        if not os_.done:
            os_.vmm_at(t + period, lambda t2: self._refresh(os_, t2, period))

    def _loop(self, os_: GuestOS, pages: list[int], c: int) -> Program:
        rng = random.Random(f"kvmmu-churn:{c}")
        bell = os_.ioremaps["virtio-net-notify"]
        status = os_.ioremaps["virtio-net-cfg"] + 0x10
        fb = os_.ioremaps.get("framebuffer")
        i = 0
        while not self.iterations or i < self.iterations:
            for _ in range(4):
                gva = DIRECT_MAP + (rng.choice(pages) << 12) + 8 * rng.randrange(512)
                if rng.random() < 0.5:
                    yield ("kaccess", gva, 8, "write", i)
                else:
                    yield ("kaccess", gva, 8, "read")
            yield ("kaccess", bell, 2, "write", 1)
            yield ("kaccess", status, 4, "read")
            if fb is not None:
                yield ("kaccess", fb + (rng.randrange(256) << 12), 8, "write", i)
            yield ("compute", os_.p.cycles(20e-6))
            i += 1
            self.loops += 1
        self.finished += 1
        if self.finished == len(os_.cpus):
            os_.done = True
        yield ("exit",)

    def result(self, os_: GuestOS) -> dict[str, Any]:
        return {"memslot_changes": self.changes, "driver_loops": self.loops}


WORKLOADS: dict[str, type[Workload]] = {w.kind: w for w in (KernelCompile, NetperfRR, MmioBench, MemslotChurn)}


def make_workload(kind: str, params: dict[str, Any]) -> Workload:
    """A workload by name with parameters; unknown names and parameters are refused."""
    cls = WORKLOADS.get(kind)
    if cls is None:
        raise InvalidArgument("workload.kind", kind, f"the workloads are {sorted(WORKLOADS)}")
    known = {f.name for f in fields(cls)}
    for k in params:
        if k not in known:
            raise InvalidArgument(f"workload.{k}", params[k], f"{kind} has no such parameter (it has: "
                                  f"{', '.join(sorted(known))})")
    w = cls(**params)
    w.validate()
    return w
