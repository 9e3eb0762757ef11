"""GuestOS: the kernel of one machine, its state, boot and report; its parts are mixins by concern
(kmem, drivers, mm, process, sched, syscalls) over the state that state.KernelState declares."""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

from ...arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from ...sim.clock import Clock
from ...sim.cost import CostModel
from ..pagetables import NX, PCD, PS, PWT, RW, G, P
from .drivers import Drivers
from .layout import DIRECT_MAP, FIXMAP_APIC, FIXMAP_HPET, FIXMAP_IOAPIC, KTEXT, KTEXT_GPA, KTEXT_SIZE, PAGE, VMALLOC
from .mm import MemoryManager
from .params import OS_COUNTERS, OsParams
from .process import Processes
from .sched import Scheduler
from .structs import Cpu, File, Frames
from .syscalls import Syscalls

if TYPE_CHECKING:
    from ..platform import Platform


class GuestOS(Drivers, MemoryManager, Processes, Scheduler, Syscalls):
    """The kernel of one machine."""

    def __init__(self, machine: Platform, params: OsParams | None = None, seed: int = 1,
                 cost: CostModel | None = None, clock: Clock | None = None) -> None:
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
        self.page_cache = OrderedDict()
        self.files = []
        self.procs = {}
        self.next_pid = 1
        self.global_rq = deque()
        self.clock = clock if clock is not None else Clock()     # one event order for every queue
        self.cpus = [Cpu(i, v, events=self.clock.queue()) for i, v in enumerate(machine.vcpus)]
        self.tick_period = self.p.cycles(1 / self.p.hz)
        self.ktables = {}
        self.ioremaps = {}
        self._vmalloc_next = VMALLOC
        self.wake_requests = []     # (cpu index, time): the host must run it then
        self.vmm_timers = self.clock.queue()   # fn(when), run by the VMM thread
        self.counters = dict.fromkeys(OS_COUNTERS, 0)
        self.cr0 = X86_CR0_PG | X86_CR0_PE | X86_CR0_WP
        self.done = False
        self.booted = False
        self.irq_handlers = {}
        self.workload = None
        self.mms = {}          # PGD gfn -> mm, until the PGD is freed

    # -- boot --------------------------------------------------------------------------------------
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

    # -- files -------------------------------------------------------------------------------------
    def new_file(self, name: str, pages: int) -> File:
        f = File(len(self.files), name, pages)
        self.files.append(f)
        return f

    # -- reporting ---------------------------------------------------------------------------------
    def summary(self) -> dict[str, int]:
        out = dict(self.counters)
        out["processes_alive"] = len(self.procs)
        out["free_frames"] = self.frames.nr_free
        out["page_cache_pages"] = len(self.page_cache)
        return out
