"""The Linux-boot workload: a real MMIO trace of Linux 6.1 booting on a 2-vCPU QEMU PC, replayed on a
modelled PC.

The data set (``kvmmu/data/linux-boot-mmio-pc-smp2/``, recorded for this project; see its README)
has one row per device access from reset to power-off: ``mmio`` rows are guest loads and stores
(with the guest-virtual address), ``pio`` rows are ``in``/``out``, ``dev`` rows are accesses made by
device models (MSI writes).  Only ``mmio`` rows are guest memory accesses; the others are counted.

`load_linux_boot()` turns the data into a `LinuxBootWorkload`:

* **Accesses.**  The recording VMM split a CPU access wider than its region into several rows (a
  2-byte store to the VGA text buffer is two 1-byte rows, an 8-byte HPET read two 4-byte rows).
  KVM sees the CPU access, so the rows of one access (same vCPU, PC, direction, consecutive
  addresses, ``cpu_size`` in total) are merged back into one record of ``cpu_size`` bytes.
* **Machine.**  Memslots are the RAM and ROM sections of the guest's flat memory view
  (``mtree_flat.txt``; ROM as ``KVM_MEM_READONLY``), cross-checked with the guest's ``/proc/iomem``.
  Two vCPUs.  The LAPIC (0xfee00000, 4 KiB) and the IOAPIC (0xfec00000, 0x100 bytes) are in-kernel
  io-bus devices (KVM's in-kernel irqchip); every other MMIO access exits to the VMM.  Both answer
  reads with the recorded value (`RecordedValues`), so the guest sees what the real guest saw.
  ``profile="qemu"`` adds what QEMU itself asks of KVM: a coalesced-MMIO zone on the VGA window
  (0xa0000-0xbffff; QEMU's ``vga_init`` sets it) and an ioeventfd on every virtio notify address
  the guest writes (the recording shows these writes completed without the device: empty value).
* **Paging.**  Firmware rows run with paging off (gva == gpa, checked).  For the kernel, 4-level
  guest page tables are built so that every (gva page -> gpa page) pair of the kernel's rows
  translates as recorded, with Linux's kernel PTE bits (``P|RW|A|D|G|NX``, ``PCD`` for MMIO).
  A gva page that maps different gpa pages over time is a `MappingConflict`; the loader reports
  it and replays what the guest must have done in between (iounmap clears the PTE, the TLB
  flush reaches every vCPU as INVLPG, ioremap writes the new PTE): stores through the direct map
  (the page-table pages are mapped there, as Linux maps all RAM) and ``invlpg`` records.
* **Control registers.**  Firmware: CR0.PE, no paging.  Kernel: CR0 = PG|AM|WP|NE|ET|MP|PE,
  CR4 = PGE|PAE|PSE, EFER = NX|LMA|LME|SCE, CR3 = the built tables.  Each vCPU's first record and
  the firmware -> kernel switch carry them (applied as KVM_SET_SREGS).
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

from ..arch.bits import (
    EFER_LMA,
    EFER_LME,
    EFER_NX,
    EFER_SCE,
    X86_CR0_AM,
    X86_CR0_ET,
    X86_CR0_MP,
    X86_CR0_NE,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR0_WP,
    X86_CR4_PAE,
    X86_CR4_PGE,
    X86_CR4_PSE,
)
from ..errors import InvalidArgument, ScenarioError
from ..kvm.iobus import CoalescedMmio
from ..kvm.vm import VM
from .boot_trace import (
    IOMEM,
    KINDS,
    MEMORY_MAP,
    Access,
    MemoryRange,
    Source,
    access_value,
    machine_name,
    mtree_vcpus,
    open_rows,
    parse_iomem,
    parse_mtree_flat,
    read_rows,
    read_text_file,
)
from .pagetables import NX, PCD, RW, A, D, G, GuestPageTables, P
from .trace import ControlRegs, RecordedValues, ReplayResult, ReplaySetup, TraceRecord, replay

DATASET = "linux-boot-mmio-pc-smp2"
FIRMWARE_PHASE = "firmware"
NR_VCPUS = 2                                         # the shipped recording's machine

LAPIC_BASE, LAPIC_SIZE = 0xFEE00000, 0x1000          # KVM's in-kernel LAPIC (apic_mmio_in_range)
IOAPIC_BASE, IOAPIC_SIZE = 0xFEC00000, 0x100         # KVM's in-kernel IOAPIC (IOAPIC_MEM_LENGTH)
VGA_WINDOW, VGA_WINDOW_SIZE = 0xA0000, 0x20000       # QEMU's coalesced "vga-lowmem"
PROFILES = ("irqchip", "qemu")

FIRMWARE_REGS: ControlRegs = {"cr0": X86_CR0_PE | X86_CR0_ET, "cr3": 0, "cr4": 0, "efer": 0}
KERNEL_CR0 = X86_CR0_PG | X86_CR0_AM | X86_CR0_WP | X86_CR0_NE | X86_CR0_ET | X86_CR0_MP | X86_CR0_PE
KERNEL_CR4 = X86_CR4_PGE | X86_CR4_PAE | X86_CR4_PSE
KERNEL_EFER = EFER_NX | EFER_LMA | EFER_LME | EFER_SCE

PT_POOL, PT_POOL_END = 0x01000000, 0x01400000        # guest RAM holding the built page tables
KERNEL_TABLE = P | RW | A | D                        # Linux's _KERNPG_TABLE
KERNEL_DATA = P | RW | A | D | G | NX                # PAGE_KERNEL
KERNEL_MMIO = KERNEL_DATA | PCD                      # ioremap / fixmap (uncached minus)
# x86-64 layout: the direct map of all RAM lives in [0xffff888000000000, 0xffffc88000000000), its
# base randomised by KASLR; the loader reads it off the recorded direct-map accesses.
DIRECT_MAP_RANGE = (0xFFFF888000000000, 0xFFFFC88000000000)



# -- the shipped data ------------------------------------------------------------------------------
def data_dir() -> Traversable:
    """The data set's folder inside the installed package."""
    return resources.files("kvmmu").joinpath("data", DATASET)


def read_text(name: str) -> str:
    """A text file of the shipped data set."""
    text = read_text_file(data_dir(), name)
    assert text is not None
    return text


def summary() -> dict:
    """The recorder's own summary.json (counts per kind, phase, vCPU, region)."""
    return json.loads(read_text("summary.json"))


# -- guest page tables, built once as an image -----------------------------------------------------
class _Image:
    """Guest-physical pages written by the page-table builder (copied into each VM's RAM)."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}

    def write(self, gpa: int, size: int, value: int) -> None:
        page = self.pages.setdefault(gpa & ~0xFFF, bytearray(4096))
        page[gpa & 0xFFF:(gpa & 0xFFF) + size] = value.to_bytes(size, "little")

    def read(self, gpa: int, size: int) -> int:
        page = self.pages.get(gpa & ~0xFFF)
        return 0 if page is None else int.from_bytes(page[gpa & 0xFFF:(gpa & 0xFFF) + size], "little")


@dataclass
class PageTables:
    cr3: int
    pages: dict[int, bytes]              # gpa of each table page -> its contents
    pte_gpa: dict[int, int]              # gva page -> gpa of its level-1 entry
    direct_map: int                      # gva of guest-physical 0 in the direct map


def _build_page_tables(mapping: dict[int, int], direct_map: int) -> PageTables:
    img = _Image()
    pt = GuestPageTables("4level", img.write, img.read, pool=PT_POOL, pool_end=PT_POOL_END)
    pte_gpa = {}
    for gva_page in sorted(mapping):
        pte_gpa[gva_page] = pt.map(gva_page, mapping[gva_page], 4096, KERNEL_MMIO, upper=KERNEL_TABLE)
    done: set[int] = set()
    while len(done) < len(pt.tables):          # the tables themselves, in the direct map (Linux maps all RAM)
        for table in list(pt.tables):
            if table not in done:
                done.add(table)
                gva = direct_map + table
                if gva not in mapping:
                    pt.map(gva, table, 4096, KERNEL_DATA, upper=KERNEL_TABLE)
    return PageTables(pt.cr3, {g: bytes(b) for g, b in sorted(img.pages.items())}, pte_gpa, direct_map)


# -- the workload ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MappingConflict:
    """A gva page the recorded guest mapped to more than one gpa page: (gpa page, first seq, last seq)
    for each mapping, in time order."""

    gva_page: int
    mappings: tuple[tuple[int, int, int], ...]

    def __str__(self) -> str:
        parts = ", ".join(f"{g:#x} (seq {a}-{b})" for g, a, b in self.mappings)
        return f"gva page {self.gva_page:#x} -> {parts}"


class IoEventFd:
    """An ioeventfd as QEMU registers it for a virtio notify address (length 0: any write size).
    Signalling it is the device's side of the write: the oracle sees it."""

    def __init__(self, values: RecordedValues) -> None:
        self.values = values
        self.signals = 0

    def read(self, addr: int, length: int) -> int | None:
        return None

    def write(self, addr: int, length: int, value: int) -> bool:
        self.signals += 1
        return self.values.write(addr, length, value)


class CoalescedZone(CoalescedMmio):
    """KVM_REGISTER_COALESCED_MMIO as `vm.register_coalesced_mmio` does it, telling the oracle
    about each write that went into the ring (the VMM applies it to the device later)."""

    def __init__(self, ring: deque, values: RecordedValues) -> None:
        super().__init__(ring)
        self.values = values

    def write(self, addr: int, length: int, value: int) -> bool:
        if not super().write(addr, length, value):
            return False
        return self.values.write(addr, length, value)


@dataclass
class LinuxBootWorkload:
    rows: int
    rows_by_kind: dict[str, int]
    rows_by_vcpu: dict[int, int]
    rows_by_phase_kind: dict[str, dict[str, int]]     # phases in log order
    mmio_rows: int
    split_rows_merged: int                            # rows folded into a wider CPU access
    memory: list[MemoryRange]
    page_tables: PageTables
    initial_map: dict[int, int]                       # gva page -> gpa page (kernel rows)
    conflicts: list[MappingConflict]
    problems: list[str]                               # consistency checks that failed (none expected)
    records: list[TraceRecord]                        # accesses + remap events, ready for replay
    mmio_index: list[int]                             # positions of the MMIO accesses in `records`
    notify_addrs: tuple[int, ...]                     # virtio notify addresses the guest wrote
    wide_values: int                                  # mmio rows whose logged value exceeded their size
    iomem: list[tuple[int, int, str, int]] = field(default_factory=list)
    nr_vcpus: int = NR_VCPUS                          # the recorded machine's vCPUs
    machine: str = "Linux 6.1 booting on a 2-vCPU QEMU PC"   # what the recording says it is
    source: str = DATASET                             # where it was loaded from

    @property
    def phases(self) -> list[str]:
        return list(self.rows_by_phase_kind)

    @property
    def mmio_accesses(self) -> int:
        return len(self.mmio_index)

    def in_kernel(self, gpa: int) -> bool:
        """Is this guest-physical address served by KVM's in-kernel irqchip (LAPIC / IOAPIC)?"""
        return LAPIC_BASE <= gpa < LAPIC_BASE + LAPIC_SIZE or IOAPIC_BASE <= gpa < IOAPIC_BASE + IOAPIC_SIZE

    # -- slices ----------------------------------------------------------------------------------
    def records_upto(self, limit: int | None) -> list[TraceRecord]:
        """The records up to and including the `limit`-th MMIO access (all if None)."""
        if limit is None or limit >= len(self.mmio_index):
            return self.records
        if limit < 0:
            raise ScenarioError(f"limit={limit}: the number of MMIO accesses to replay is >= 0")
        return self.records[:self.mmio_index[limit - 1] + 1] if limit else []

    def window(self, start: int, count: int) -> list[TraceRecord]:
        """MMIO accesses [start, start + count) with the guest state they need: the remap events
        that happened earlier are replayed first, and each vCPU's first record carries its control
        registers."""
        if not 0 <= start < len(self.mmio_index) or count < 0:
            raise ScenarioError(f"window start={start}, count={count}: the trace has {len(self.mmio_index)} "
                                "MMIO accesses")
        if start == 0:
            return self.records_upto(count)
        lo = self.mmio_index[start]
        hi = self.mmio_index[min(start + count, len(self.mmio_index)) - 1] + 1
        earlier = [r for r in self.records[:lo] if r.region is None]
        out = earlier + self.records[lo:hi]
        seen: set[int] = set()
        for i, rec in enumerate(out):
            if rec.vcpu not in seen:
                seen.add(rec.vcpu)
                if not rec.has_sregs:
                    out[i] = replace(rec, **self._regs(rec.phase != FIRMWARE_PHASE))
        return out

    def _regs(self, paging: bool) -> ControlRegs:
        if not paging:
            return FIRMWARE_REGS.copy()
        return {"cr0": KERNEL_CR0, "cr3": self.page_tables.cr3, "cr4": KERNEL_CR4, "efer": KERNEL_EFER}

    # -- the machine -----------------------------------------------------------------------------
    def setup(self, flavour: str = "shadow", policy: str = "generation", profile: str = "irqchip",
              **vm_options: Any) -> ReplaySetup:
        """A fresh VM for this workload: memslots, page tables in RAM, devices, the recorded machine's vCPUs.
        `vm_options` are more keywords of `kvm.vm.VM` (which checks them)."""
        if profile not in PROFILES:
            raise ScenarioError(f"profile={profile!r}: the device profile is one of {PROFILES}")
        vm = VM(mmu=flavour, mmio_caching=policy, **vm_options)
        for slot, r in enumerate(self.memory):
            vm.set_user_memory_region(slot=slot, guest_phys_addr=r.start, memory_size=r.size, flags=r.flags)
        for gpa, data in self.page_tables.pages.items():
            vm.write_phys(gpa, data)
        values = RecordedValues()
        vm.register_io_device(LAPIC_BASE, LAPIC_SIZE, values)
        vm.register_io_device(IOAPIC_BASE, IOAPIC_SIZE, values)
        if profile == "qemu":
            # vm.register_coalesced_mmio(), with a zone that tells the oracle what went into the ring
            vm.register_io_device(VGA_WINDOW, VGA_WINDOW_SIZE, CoalescedZone(vm.coalesced_ring, values))
            for addr in self.notify_addrs:
                vm.register_io_device(addr, 0, IoEventFd(values))
        vm.mmio_handler = values
        vcpus = [vm.create_vcpu() for _ in range(self.nr_vcpus)]
        return ReplaySetup(vm, vcpus, values)

    def replay(self, flavour: str = "shadow", policy: str = "generation", limit: int | None = None,
               profile: str = "irqchip", progress: Callable[[float], None] | None = None,
               **vm_options: Any) -> ReplayResult:
        """Replay the first `limit` MMIO accesses (all if None) on a fresh VM."""
        return replay(self.setup(flavour, policy, profile, **vm_options), self.records_upto(limit),
                      progress=progress)


# -- loading ---------------------------------------------------------------------------------------
def load_linux_boot(path: str | os.PathLike | None = None) -> LinuxBootWorkload:
    """Load a recorded boot: the shipped data set (None; loaded once and cached) or the trace
    directory at `path` (or its ``mmio_trace.csv[.gz]``), whose own memory map, iomem and machine
    description are read (docs/workloads.md, "Recorded trace directories").  Damaged or
    inconsistent files raise `ScenarioError` before anything is replayed."""
    if path is None:
        return _load_shipped()
    p = Path(path)
    if p.is_file() and p.name.startswith("mmio_trace.csv"):
        p = p.parent
    if not p.exists():
        raise ScenarioError(f"trace directory {str(path)!r}: no such directory")
    if not p.is_dir():
        raise ScenarioError(f"trace directory {str(path)!r}: not a directory (give the folder holding "
                            "mmio_trace.csv.gz and mtree_flat.txt)")
    return _build(p, machine_name(p, p.resolve().name or str(p)), str(p))


@functools.lru_cache(maxsize=1)
def _load_shipped() -> LinuxBootWorkload:
    root = data_dir()
    return _build(root, machine_name(root, DATASET), DATASET)


def _build(root: Source, machine: str, source: str) -> LinuxBootWorkload:
    memory_text = read_text_file(root, MEMORY_MAP)
    assert memory_text is not None
    memory = parse_mtree_flat(memory_text)
    iomem_text = read_text_file(root, IOMEM, required=False)
    iomem = parse_iomem(iomem_text) if iomem_text is not None else []
    fh, where = open_rows(root)
    with fh:
        counts, accesses = read_rows(fh, where)
    seen = [v for v in counts["vcpu"] if v >= 0]
    nr_vcpus = mtree_vcpus(memory_text) or (max(seen) + 1 if seen else 1)
    for acc in accesses:
        if acc.vcpu >= nr_vcpus:
            raise ScenarioError(f"{where} line {acc.line}: vcpu={acc.vcpu}: the recorded machine has {nr_vcpus} "
                                f"vCPUs ({MEMORY_MAP} names cpu-memory-0..{nr_vcpus - 1})")
    if accesses and not any(r.kind == "ram" and r.start <= PT_POOL and r.end >= PT_POOL_END for r in memory):
        raise ScenarioError(f"{MEMORY_MAP}: no RAM section holds [{PT_POOL:#x}, {PT_POOL_END:#x}), where the "
                            "replay builds the kernel's page tables (a Linux guest has RAM there)")
    problems: list[str] = []
    for start, end, name, depth in iomem:
        if depth == 0 and name == "System RAM" and not any(r.start <= start and end <= r.end and r.kind == "ram"
                                                           for r in memory):
            problems.append(f"/proc/iomem System RAM [{start:#x}, {end:#x}) is not inside one RAM memslot")

    # The mapping the kernel's accesses imply, in time order.
    history: dict[int, list[list[int]]] = {}
    direct_bases: Counter = Counter()
    for acc in accesses:
        if (acc.gva ^ acc.gpa) & 0xFFF:
            problems.append(f"line {acc.line}: gva {acc.gva:#x} and gpa {acc.gpa:#x} differ in page offset")
        if any(r.start <= acc.gpa < r.end for r in memory):
            problems.append(f"line {acc.line}: MMIO at gpa {acc.gpa:#x} lies inside a memslot")
        if acc.phase == FIRMWARE_PHASE:
            if acc.gva >> 32:
                raise ScenarioError(f"{where} line {acc.line}: gva={acc.gva:#x}: firmware runs with paging off "
                                    "in 32-bit protected mode, so its addresses are below 4 GiB")
            if acc.gva != acc.gpa:
                problems.append(f"line {acc.line}: firmware runs with paging off, but gva {acc.gva:#x} != gpa")
            continue
        gp, pp = acc.gva & ~0xFFF, acc.gpa & ~0xFFF
        if DIRECT_MAP_RANGE[0] <= gp < DIRECT_MAP_RANGE[1]:
            direct_bases[gp - pp] += 1
        h = history.setdefault(gp, [])
        if h and h[-1][0] == pp:
            h[-1][2] = acc.seq
        else:
            h.append([pp, acc.seq, acc.seq])
    if len(direct_bases) > 1:
        problems.append(f"direct-map accesses disagree on the direct map's base: {sorted(direct_bases)}")
    direct_map = direct_bases.most_common(1)[0][0] if direct_bases else DIRECT_MAP_RANGE[0]
    conflicts = [MappingConflict(g, tuple((pa, first, last) for pa, first, last in h))
                 for g, h in sorted(history.items()) if len(h) > 1]
    initial = {g: h[0][0] for g, h in history.items()}
    try:
        tables = _build_page_tables(initial, direct_map)
    except InvalidArgument as exc:
        raise ScenarioError(f"{where}: the kernel's mappings cannot be built as 4-level page tables ({exc})") from None

    records, mmio_index, wide = _records(accesses, tables, where)
    notify = tuple(sorted({a.gpa for a in accesses if a.write and a.region.startswith("virtio-pci-notify")}))
    return LinuxBootWorkload(
        rows=counts["rows"], rows_by_kind=dict(counts["kind"]), rows_by_vcpu=dict(counts["vcpu"]),
        rows_by_phase_kind={p: dict(c) for p, c in counts["phase_kind"].items()},
        mmio_rows=counts["kind"]["mmio"], split_rows_merged=counts["merged"], memory=memory, page_tables=tables,
        initial_map=initial, conflicts=conflicts, problems=problems, records=records, mmio_index=mmio_index,
        notify_addrs=notify, wide_values=wide, iomem=iomem, nr_vcpus=nr_vcpus, machine=machine, source=source)


def _records(accesses: list[Access], tables: PageTables, where: str) -> tuple[list[TraceRecord], list[int], int]:
    """The replayable stream: MMIO accesses, control registers where a vCPU's mode changes, and the
    guest's page-table updates where a gva page changes its mapping."""
    records: list[TraceRecord] = []
    mmio_index: list[int] = []
    mode: dict[int, bool] = {}                 # vCPU -> paging on?
    wide = 0
    current: dict[int, int] = {}
    kernel: ControlRegs = {"cr0": KERNEL_CR0, "cr3": tables.cr3, "cr4": KERNEL_CR4, "efer": KERNEL_EFER}

    def regs(vcpu: int, paging: bool) -> ControlRegs:
        if mode.get(vcpu) == paging:
            return {}
        mode[vcpu] = paging
        return kernel.copy() if paging else FIRMWARE_REGS.copy()

    for acc in accesses:
        paging = acc.phase != FIRMWARE_PHASE
        gp, pp = acc.gva & ~0xFFF, acc.gpa & ~0xFFF
        if paging:
            old = current.setdefault(gp, pp)
            if old != pp:
                # iounmap cleared the PTE, the TLB flush reached every vCPU, ioremap set the new PTE.
                pte = tables.pte_gpa[gp]
                store = tables.direct_map + pte
                records.append(TraceRecord(acc.vcpu, "write", store, 8, 0, pte, phase=acc.phase,
                                           **regs(acc.vcpu, True)))
                for v in [acc.vcpu, *sorted(x for x in mode if x != acc.vcpu)]:
                    if mode.get(v):
                        records.append(TraceRecord(v, "invlpg", gp, phase=acc.phase))
                records.append(TraceRecord(acc.vcpu, "write", store, 8, pp | KERNEL_MMIO, pte, phase=acc.phase))
                current[gp] = pp
        value, w = access_value(acc, where)
        wide += w
        mmio_index.append(len(records))
        records.append(TraceRecord(acc.vcpu, "write" if acc.write else "read", acc.gva, acc.size, value,
                                   acc.gpa, phase=acc.phase, region=acc.region, seq=acc.seq, line=acc.line,
                                   **regs(acc.vcpu, paging)))
    return records, mmio_index, wide


__all__ = [
    "DATASET", "FIRMWARE_PHASE", "IOAPIC_BASE", "KINDS", "LAPIC_BASE", "PROFILES", "CoalescedZone", "IoEventFd",
    "LinuxBootWorkload", "MappingConflict", "MemoryRange", "PageTables", "data_dir", "load_linux_boot",
    "parse_iomem", "parse_mtree_flat", "summary",
]
