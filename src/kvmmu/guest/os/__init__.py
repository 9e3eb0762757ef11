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
the cost model charges for what KVM did (`kvmmu.sim.cost.CostModel`).

The package is split by concern: `layout` (addresses), `params` (OsParams, counters), `structs`
(frames, VMAs, mm, processes, per-CPU state), and GuestOS (`kernel`) made of `kmem` (kernel memory
and page-table writes), `drivers` (APIC, ioremap, virtio-blk), `mm` (faults, page cache, munmap),
`process` (spawn, fork, exec, exit), `sched` (scheduler, ticks, the time model) and `syscalls`.
"""

from __future__ import annotations

from .kernel import GuestOS
from .layout import (
    DIRECT_MAP,
    FIXMAP_APIC,
    FIXMAP_HPET,
    FIXMAP_IOAPIC,
    KERNEL_PGD_SLOTS,
    KTEXT,
    KTEXT_GPA,
    KTEXT_SIZE,
    PAGE,
    PF_FETCH,
    PF_PRESENT,
    PF_WRITE,
    TLB_SINGLE_PAGE_FLUSH_CEILING,
    USER_DATA,
    USER_HEAP,
    USER_MMAP,
    USER_STACK_TOP,
    USER_TEXT,
    VMALLOC,
)
from .params import OS_COUNTERS, OS_INT_MAX, GuestPanic, Op, OsParams, Program
from .structs import MM, Cpu, File, Frames, Image, Process, UserPage, Vma

__all__ = [
    "DIRECT_MAP", "FIXMAP_APIC", "FIXMAP_HPET", "FIXMAP_IOAPIC", "KERNEL_PGD_SLOTS", "KTEXT", "KTEXT_GPA",
    "KTEXT_SIZE", "MM", "OS_COUNTERS", "OS_INT_MAX", "PAGE", "PF_FETCH", "PF_PRESENT", "PF_WRITE",
    "TLB_SINGLE_PAGE_FLUSH_CEILING", "USER_DATA", "USER_HEAP", "USER_MMAP", "USER_STACK_TOP", "USER_TEXT",
    "VMALLOC", "Cpu", "File", "Frames", "GuestOS", "GuestPanic", "Image", "Op", "OsParams", "Process",
    "Program", "UserPage", "Vma",
]
