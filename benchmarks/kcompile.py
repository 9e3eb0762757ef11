"""A kernel-compile-like workload: three 4-vCPU 512 MiB guests, each running many short processes.

Deterministic (seeded) and self-contained; a stand-in until a recorded workload exists.  Per VM:

- a "kernel": tables for the upper half built once at boot (PML4[511] -> one PDPT shared by every
  process, as Linux shares its kernel mappings), kernel data pages and an MMIO register page (a
  virtio-style doorbell, no memslot behind it);
- processes ("cc1"): each gets fresh 4-level page tables (kvmmu.guest.pagetables written through the
  VMM's mapping, vm_writer), text pages shared through the page cache (same frames in every
  process), heap and stack pages from a free list of frames (freed at exit and reused);
- each vCPU runs one process at a time, in time slices round-robin with the other vCPUs; starting a
  process is a MOV CR3 to its fresh tables; the process fetches, reads and writes its pages (first
  touches fault, re-touches hit the TLB), makes short CPL0 excursions into kernel data (system
  calls) and, rarely, rings the doorbell (an MMIO write).

The knob that decides the figure is the fault density.  By default a process makes 24,000 accesses
over its 50-100 pages (about one full shadow fault per 180 accesses, 1 MMIO write per 2,000); a real
cc1 makes ~10^8 accesses and takes a fault every ~10^4, so even this is a fault-heavy compile.  The
"fault-heavy" variant of `make bench` (6,000 accesses per process, a fault per ~50) shows what the
fault path costs when it dominates.

`python -m benchmarks.kcompile [--serial] [--profile] [--accesses N] [--processes N]` runs it alone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import resource
import time
from dataclasses import dataclass, field

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.guest.pagetables import NX, RW, US, GuestPageTables, P, vm_writer

LONG_MODE = dict(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
MiB = 1 << 20
RAM = 512 * MiB
VCPUS = 4
VMS = 3

# Guest-physical layout.
KERNEL_PT_POOL = 0x0010_0000          # the kernel's own tables
KERNEL_DATA = 0x0020_0000             # kernel data (slab, page cache metadata, per-cpu areas)
KERNEL_DATA_PAGES = 256
CC1_TEXT = 0x0100_0000                # the compiler's text in the page cache, shared by all processes
PT_POOL = 0x0200_0000                 # process page tables (fresh pages, bump-allocated)
PT_POOL_END = 0x0800_0000
USER_FRAMES = 0x0800_0000             # anonymous memory of processes (a free list)
MMIO_GPA = 0xFEB0_0000                # a device register page (no memslot: MMIO)

# Guest-virtual layout.
KERNEL_BASE = 0xFFFF_FF80_0000_0000   # PML4[511]
KERNEL_MMIO = KERNEL_BASE + 0x4000_0000
TEXT = 0x0040_0000
HEAP = 0x0100_0000
STACK = 0x7FFF_FFF0_0000

Op = tuple[int, int, str, int | None, int]          # (gva, size, kind, value, cpl)


@dataclass
class Template:
    """One process image: its page counts and its access stream (the same gvas in every process)."""

    text_pages: int
    heap_pages: int
    stack_pages: int
    ops: list[Op] = field(default_factory=list)
    decoded: object = None        # kvmmu.hw.cpu.DecodedAccesses of ops, when the batch API exists


def _pick(rng: random.Random, touched: list[int]) -> int:
    """A previously touched page: mostly one of the few most recent, sometimes any."""
    if rng.random() < 0.75:
        return touched[-1 - min(int(rng.expovariate(0.7)), len(touched) - 1)]
    return touched[rng.randrange(len(touched))]


def make_template(rng: random.Random, n: int) -> Template:
    """A process of about n accesses: 30% fetches, 40% heap, 15% stack, 14% kernel, ~1/2000 MMIO."""
    t = Template(text_pages=rng.randrange(16, 33), heap_pages=rng.randrange(32, 65), stack_pages=rng.randrange(2, 9))
    regions = {"text": (TEXT, t.text_pages), "heap": (HEAP, t.heap_pages), "stack": (STACK, t.stack_pages)}
    # Each user page is first touched at a random moment of the process's life.
    first_touch = {name: sorted(rng.sample(range(1, n), pages - 1)) for name, (_, pages) in regions.items()}
    touched: dict[str, list[int]] = {name: [0] for name in regions}
    fresh = {name: 1 for name in regions}
    kernel_touched: list[int] = [rng.randrange(KERNEL_DATA_PAGES)]
    ops = t.ops
    sizes = (1, 2, 4, 8, 8, 4, 8, 8)
    i = 0
    while i < n:
        x = rng.random()
        if x < 0.0005:
            ops.append((KERNEL_MMIO + 4 * rng.randrange(4), 4, "write", rng.getrandbits(32), 0))
            i += 1
            continue
        if x < 0.03:                                   # a system call: a short burst in the kernel
            for _ in range(rng.randrange(4, 12)):
                if rng.random() < 0.1:
                    kernel_touched.append(rng.randrange(KERNEL_DATA_PAGES))
                page = _pick(rng, kernel_touched)
                size = rng.choice(sizes)
                gva = KERNEL_BASE + page * 0x1000 + rng.randrange(0x1000 // size) * size
                if rng.random() < 0.4:
                    ops.append((gva, size, "write", rng.getrandbits(8 * size), 0))
                else:
                    ops.append((gva, size, "read", None, 0))
                i += 1
            continue
        name = "text" if x < 0.33 else "heap" if x < 0.80 else "stack"
        base, _pages = regions[name]
        ft = first_touch[name]
        if ft and i >= ft[0]:
            ft.pop(0)
            page = fresh[name]
            fresh[name] += 1
            touched[name].append(page)
        else:
            page = _pick(rng, touched[name])
        size = rng.choice(sizes)
        gva = base + page * 0x1000 + rng.randrange(0x1000 // size) * size
        if name == "text":
            ops.append((gva, size, "fetch", None, 3))
        elif rng.random() < 0.35:
            ops.append((gva, size, "write", rng.getrandbits(8 * size), 3))
        else:
            ops.append((gva, size, "read", None, 3))
        i += 1
    return t


class Guest:
    """One VM: its kernel, its frame allocator, its vCPUs and what each is running."""

    def __init__(self, seed: int, templates: int = 8, accesses: int = 24_000, mmu: str = "shadow") -> None:
        rng = random.Random(seed)
        self.rng = rng
        self.templates = [make_template(rng, accesses) for _ in range(templates)]
        try:
            from kvmmu.hw.cpu import DecodedAccesses
        except ImportError:          # before issue 7: no batch API
            DecodedAccesses = None  # noqa: N806
        for t in self.templates:
            t.decoded = DecodedAccesses(t.ops) if DecodedAccesses is not None else None
        # KVM's default quota: 20 shadow pages per 1000 guest pages (kvm_mmu_calculate_default_mmu_pages).
        self.vm = vm = kvmmu.VM(mmu=mmu, mmio_caching="generation", max_mmu_pages=(RAM >> 12) * 20 // 1000)
        vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=RAM)
        vm.mmio_handler = lambda exit_: 0
        self.write, self.read = vm_writer(vm)
        kernel = GuestPageTables("4level", self.write, self.read, pool=KERNEL_PT_POOL, pool_end=KERNEL_DATA)
        for i in range(KERNEL_DATA_PAGES):
            kernel.map(KERNEL_BASE + i * 0x1000, KERNEL_DATA + i * 0x1000, flags=P | RW | NX, upper=P | RW)
        kernel.map(KERNEL_MMIO, MMIO_GPA, flags=P | RW | NX, upper=P | RW)
        self.kernel_pml4e = self.read(kernel.root + 8 * 511, 8)
        self.next_table = PT_POOL
        self.free_frames = list(range(RAM - 0x1000, USER_FRAMES - 1, -0x1000))
        self.vcpus = [vm.create_vcpu() for _ in range(VCPUS)]
        for v in self.vcpus:
            v.set_sregs(cr3=kernel.root, cpl=3, **LONG_MODE)
        self.running: list[tuple[Template, list[int]] | None] = [None] * VCPUS
        self.processes = 0

    def start_process(self, vcpu_index: int) -> Template:
        """exec: fresh tables mapping the shared text and fresh frames, then MOV CR3."""
        t = self.templates[self.rng.randrange(len(self.templates))]
        pool = self.next_table
        pt = GuestPageTables("4level", self.write, self.read, pool=pool, pool_end=PT_POOL_END)
        frames = []
        for i in range(t.text_pages):
            pt.map(TEXT + i * 0x1000, CC1_TEXT + i * 0x1000, flags=P | US)
        for base, pages in ((HEAP, t.heap_pages), (STACK, t.stack_pages)):
            for i in range(pages):
                frame = self.free_frames.pop()
                frames.append(frame)
                pt.map(base + i * 0x1000, frame, flags=P | RW | US | NX)
        self.write(pt.root + 8 * 511, 8, self.kernel_pml4e)
        self.next_table = pt.next
        self.running[vcpu_index] = (t, frames)
        self.vcpus[vcpu_index].write_cr3(pt.cr3)
        self.processes += 1
        return t

    def exit_process(self, vcpu_index: int) -> None:
        running = self.running[vcpu_index]
        assert running is not None
        self.free_frames.extend(reversed(running[1]))
        self.running[vcpu_index] = None


def run_guest(seed: int, processes_per_vcpu: int, slice_len: int = 200, batch: bool = True,
              mmu: str = "shadow", accesses_per_process: int = 24_000) -> dict[str, float]:
    """Run one VM's workload; returns its accesses, start/end times (perf_counter) and peak RSS."""
    g = Guest(seed, accesses=accesses_per_process, mmu=mmu)
    batch = batch and g.templates[0].decoded is not None
    accesses = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    left = [processes_per_vcpu] * VCPUS
    pos = [0] * VCPUS
    current: list[Template | None] = [None] * VCPUS
    active = VCPUS
    while active:
        active = 0
        for i, vcpu in enumerate(g.vcpus):
            t = current[i]
            if t is None:
                if not left[i]:
                    continue
                left[i] -= 1
                t = current[i] = g.start_process(i)
                pos[i] = 0
            active += 1
            start = pos[i]
            stop = min(start + slice_len, len(t.ops))
            if batch:
                done, bad = vcpu.run_accesses(t.decoded, start=start, stop=stop)
                if bad is not None:
                    raise AssertionError(f"vcpu {i}: the process faulted: {bad.fault} at op {done}")
            else:
                access = vcpu.access
                for gva, size, kind, value, cpl in t.ops[start:stop]:
                    r = access(gva, size, kind, value, cpl)
                    if r.fault is not None:
                        raise AssertionError(f"vcpu {i}: the process faulted at {gva:#x}: {r.fault}")
            accesses += stop - start
            pos[i] = stop
            if stop >= len(t.ops):
                g.exit_process(i)
                current[i] = None
        g.vm.mmio_log.clear()                  # the VMM does not keep every exit it answered
    t1 = time.perf_counter()
    cpu = time.process_time() - c0
    faults = sum(v.stats["pf_fixed"] for v in g.vcpus)
    return {"accesses": accesses, "start": t0, "end": t1, "cpu": cpu, "rss_mb": _peak_rss_mb(),
            "processes": g.processes, "batch": batch, "pf_fixed": faults,
            "mmio_exits": sum(v.stats["mmio_exits"] for v in g.vcpus),
            "tlb_hits": sum(v.counters["tlb_hits"] for v in g.vcpus), "shadow_pages": g.vm.mmu.n_used_mmu_pages}


def _peak_rss_mb() -> float:
    """Peak RSS of this process image: VmHWM (ru_maxrss would include the parent's peak from before
    the exec of a spawned worker, which Linux carries over)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(seed: int, processes_per_vcpu: int, batch: bool, mmu: str, accesses_per_process: int, barrier: object,
            out: object) -> None:
    barrier.wait()                              # type: ignore[attr-defined]
    out.put(run_guest(seed, processes_per_vcpu, batch=batch, mmu=mmu,  # type: ignore[attr-defined]
                      accesses_per_process=accesses_per_process))


def run_three(processes_per_vcpu: int = 4, batch: bool = True, parallel: bool = True, mmu: str = "shadow",
              seed: int = 1000, accesses_per_process: int = 24_000) -> dict[str, float]:
    """Three VMs, each in its own process (VMs are independent); aggregate accesses/s and summed peak RSS.

    `rate` is the aggregate on an otherwise idle machine with this many cores: the accesses over
    the time the three CPU times need when scheduled on min(cores, 3) cores (the machines are
    shared, so wall-clock time measures the neighbours too); `wall_rate` is what the wall clock saw.
    """
    seeds = [seed + i for i in range(VMS)]
    if not parallel:
        results = [run_guest(s, processes_per_vcpu, batch=batch, mmu=mmu, accesses_per_process=accesses_per_process)
                   for s in seeds]
        wall = sum(r["end"] - r["start"] for r in results)
        rss = _peak_rss_mb()
    else:
        ctx = mp.get_context("spawn")          # fresh interpreters: RSS is the workload's, not the parent's
        barrier = ctx.Barrier(VMS)
        out = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(s, processes_per_vcpu, batch, mmu, accesses_per_process,
                                                   barrier, out)) for s in seeds]
        for p in procs:
            p.start()
        results = [out.get() for _ in procs]
        for p in procs:
            p.join()
            if p.exitcode:
                raise RuntimeError(f"a workload process failed with exit code {p.exitcode}")
        wall = max(r["end"] for r in results) - min(r["start"] for r in results)
        rss = sum(r["rss_mb"] for r in results)
    total = sum(r["accesses"] for r in results)
    cores = min(os.cpu_count() or 1, VMS) if parallel else 1
    cpu = sum(r["cpu"] for r in results)
    ideal = max(cpu / cores, max(r["cpu"] for r in results))
    return {"accesses": total, "seconds": ideal, "rate": total / ideal, "wall_rate": total / wall, "cpu": cpu,
            "cores": cores, "rss_mb": rss, "rss_max_mb": max(r["rss_mb"] for r in results),
            "batch": all(r["batch"] for r in results),
            "processes": sum(r["processes"] for r in results), "pf_fixed": sum(r["pf_fixed"] for r in results),
            "tlb_hits": sum(r["tlb_hits"] for r in results), "mmio_exits": sum(r["mmio_exits"] for r in results),
            "shadow_pages": max(r["shadow_pages"] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serial", action="store_true", help="run the three VMs one after the other in this process")
    ap.add_argument("--per-call", action="store_true", help="use vcpu.access per access instead of run_accesses")
    ap.add_argument("--processes", type=int, default=4, help="processes per vCPU (default 4)")
    ap.add_argument("--accesses", type=int, default=24_000, help="accesses per process (default 24000)")
    ap.add_argument("--mmu", default="shadow", choices=("shadow", "ept", "npt"))
    ap.add_argument("--profile", action="store_true", help="cProfile one VM in this process")
    args = ap.parse_args()
    batch = not args.per_call
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        r = run_guest(1000, args.processes, batch=batch, mmu=args.mmu, accesses_per_process=args.accesses)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        print(r)
        return
    r = run_three(args.processes, batch=batch, parallel=not args.serial, mmu=args.mmu,
                  accesses_per_process=args.accesses)
    print({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()})


if __name__ == "__main__":
    main()
