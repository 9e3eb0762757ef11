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

import csv
import functools
import gzip
import io
import json
import re
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from importlib import resources
from importlib.abc import Traversable

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
from ..errors import ScenarioError
from ..kvm.iobus import CoalescedMmio
from ..kvm.memslots import KVM_MEM_READONLY
from ..kvm.vm import VM
from .pagetables import NX, PCD, RW, A, D, G, GuestPageTables, P
from .trace import RecordedValues, ReplayResult, ReplaySetup, TraceRecord, replay

DATASET = "linux-boot-mmio-pc-smp2"
KINDS = ("mmio", "pio", "dev")
FIRMWARE_PHASE = "firmware"
NR_VCPUS = 2

LAPIC_BASE, LAPIC_SIZE = 0xFEE00000, 0x1000          # KVM's in-kernel LAPIC (apic_mmio_in_range)
IOAPIC_BASE, IOAPIC_SIZE = 0xFEC00000, 0x100         # KVM's in-kernel IOAPIC (IOAPIC_MEM_LENGTH)
VGA_WINDOW, VGA_WINDOW_SIZE = 0xA0000, 0x20000       # QEMU's coalesced "vga-lowmem"
PROFILES = ("irqchip", "qemu")

FIRMWARE_REGS = {"cr0": X86_CR0_PE | X86_CR0_ET, "cr3": 0, "cr4": 0, "efer": 0}
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

_MTREE_LINE = re.compile(r"^\s+([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (\w+)\): (.+)$")
_IOMEM_LINE = re.compile(r"^(\s*)([0-9a-f]+)-([0-9a-f]+) : (.+)$")


# -- the shipped data ------------------------------------------------------------------------------
def data_dir() -> Traversable:
    """The data set's folder inside the installed package."""
    return resources.files("kvmmu").joinpath("data", DATASET)


def read_text(name: str) -> str:
    return data_dir().joinpath(name).read_text(encoding="utf-8")


def summary() -> dict:
    """The recorder's own summary.json (counts per kind, phase, vCPU, region)."""
    return json.loads(read_text("summary.json"))


# -- the memory map --------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryRange:
    """One RAM or ROM section of the guest's flat memory view: one memslot."""

    start: int
    end: int                 # exclusive
    kind: str                # "ram" | "rom"
    name: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def flags(self) -> int:
        return KVM_MEM_READONLY if self.kind == "rom" else 0


def parse_mtree_flat(text: str, address_space: str = "memory") -> list[MemoryRange]:
    """RAM/ROM sections of the flat view that serves `address_space` (QEMU's `info mtree -f`)."""
    views = text.split("FlatView #")[1:]
    for view in views:
        if f'AS "{address_space}",' not in view:
            continue
        out = []
        for line in view.splitlines():
            m = _MTREE_LINE.match(line)
            if m and m.group(3) in ("ram", "rom"):
                start, last = int(m.group(1), 16), int(m.group(2), 16)
                out.append(MemoryRange(start, last + 1, m.group(3), m.group(4).strip()))
        for r in out:
            if r.start % 4096 or r.end % 4096:
                raise ScenarioError(f"mtree_flat.txt: section {r.name} [{r.start:#x}, {r.end:#x}) is not "
                                    "page-aligned, so it cannot be a memslot")
        return out
    raise ScenarioError(f"mtree_flat.txt: no flat view serves the address space {address_space!r}")


def parse_iomem(text: str) -> list[tuple[int, int, str, int]]:
    """/proc/iomem as (start, end exclusive, name, nesting depth)."""
    out = []
    for line in text.splitlines():
        m = _IOMEM_LINE.match(line)
        if m:
            out.append((int(m.group(2), 16), int(m.group(3), 16) + 1, m.group(4), len(m.group(1)) // 2))
    return out


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

    def _regs(self, paging: bool) -> dict[str, int]:
        if not paging:
            return dict(FIRMWARE_REGS)
        return {"cr0": KERNEL_CR0, "cr3": self.page_tables.cr3, "cr4": KERNEL_CR4, "efer": KERNEL_EFER}

    # -- the machine -----------------------------------------------------------------------------
    def setup(self, flavour: str = "shadow", policy: str = "generation", profile: str = "irqchip",
              **vm_options: object) -> ReplaySetup:
        """A fresh VM for this workload: memslots, page tables in RAM, devices, two vCPUs."""
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
        vcpus = [vm.create_vcpu() for _ in range(NR_VCPUS)]
        return ReplaySetup(vm, vcpus, values)

    def replay(self, flavour: str = "shadow", policy: str = "generation", limit: int | None = None,
               profile: str = "irqchip", **vm_options: object) -> ReplayResult:
        """Replay the first `limit` MMIO accesses (all if None) on a fresh VM."""
        return replay(self.setup(flavour, policy, profile, **vm_options), self.records_upto(limit))


# -- loading ---------------------------------------------------------------------------------------
def _hexfield(text: str, line: int, name: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        raise ScenarioError(f"mmio_trace.csv line {line}: column {name}={text!r} is not a hex number") from None


@dataclass
class _Access:
    line: int
    seq: int
    vcpu: int
    write: bool
    gva: int
    gpa: int
    size: int
    region: str
    phase: str
    parts: list[str]
    got: int
    pc: str


def _read_rows(text: io.TextIOBase) -> tuple[dict, list[_Access]]:
    reader = csv.reader(text)
    header = next(reader, None)
    want = ["seq", "vcpu", "kind", "is_write", "addr", "size", "value", "region", "pc", "gva", "cpu_size", "phase"]
    if header != want:
        raise ScenarioError(f"mmio_trace.csv: the header is {header}, expected {want}")
    counts = {"rows": 0, "kind": Counter(), "vcpu": Counter(), "phase_kind": {}, "merged": 0}
    phase_kind: dict[str, Counter] = counts["phase_kind"]
    accesses: list[_Access] = []
    pending: dict[int, _Access] = {}
    for line, row in enumerate(reader, 2):
        if len(row) != len(want):
            raise ScenarioError(f"mmio_trace.csv line {line}: {len(row)} columns, expected {len(want)}")
        seq, vcpu, kind, is_write, addr, size, value, region, pc, gva, cpu_size, phase = row
        if kind not in KINDS:
            raise ScenarioError(f"mmio_trace.csv line {line}: kind={kind!r}: a row is one of {KINDS}")
        counts["rows"] += 1
        counts["kind"][kind] += 1
        counts["vcpu"][int(vcpu)] += 1
        phase_kind.setdefault(phase, Counter())[kind] += 1
        if kind != "mmio":
            continue
        if not gva or not cpu_size:
            raise ScenarioError(f"mmio_trace.csv line {line}: an mmio row needs gva and cpu_size")
        v, n, cs = int(vcpu), int(size), int(cpu_size)
        g, a = _hexfield(gva, line, "gva"), _hexfield(addr, line, "addr")
        part = _Access(line, int(seq), v, is_write == "1", g, a, n, region, phase, [value], n, pc)
        cur = pending.get(v)
        if cur is not None:
            if g != cur.gva + cur.got or a != cur.gpa + cur.got or pc != cur.pc or part.write != cur.write \
                    or cur.size != cs:
                raise ScenarioError(f"mmio_trace.csv line {line}: vCPU {v}'s access split at line {cur.line} "
                                    "is interrupted by an access that does not continue it")
            cur.parts.append(value)
            cur.got += n
            counts["merged"] += 1
            if cur.got == cur.size:
                del pending[v]
            elif cur.got > cur.size:
                raise ScenarioError(f"mmio_trace.csv line {line}: the pieces exceed cpu_size={cur.size}")
            continue
        if n == cs:
            accesses.append(part)
        elif n < cs:
            part.size = cs
            pending[v] = part
            accesses.append(part)
        else:
            raise ScenarioError(f"mmio_trace.csv line {line}: size={n} exceeds cpu_size={cs}")
    if pending:
        cur = next(iter(pending.values()))
        raise ScenarioError(f"mmio_trace.csv line {cur.line}: the trace ends inside a split access")
    return counts, accesses


def _value(acc: _Access) -> tuple[int | None, int]:
    """The access's value from its rows, and how many rows logged more bits than their size.

    The recorder logged what the device model returned; for a few 4-byte HPET reads that is the
    whole 64-bit register, of which the CPU (and so the guest) got the low `size` bytes."""
    if any(p == "" for p in acc.parts):
        return None, 0
    piece = acc.size // len(acc.parts)
    mask = (1 << (8 * piece)) - 1
    out = wide = 0
    for i, p in enumerate(acc.parts):
        try:
            v = int(p, 16)
        except ValueError:
            raise ScenarioError(f"mmio_trace.csv line {acc.line}: value={p!r} is not a hex number") from None
        wide += v > mask
        out |= (v & mask) << (8 * piece * i)
    return out, wide


def load_linux_boot(path: str | None = None) -> LinuxBootWorkload:
    """Load the shipped data set (or a copy of `mmio_trace.csv.gz` at `path`; the memory map files
    always come from the package).  The shipped data is loaded once and cached."""
    if path is None:
        return _load_shipped()
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        return _build(fh)


@functools.lru_cache(maxsize=1)
def _load_shipped() -> LinuxBootWorkload:
    with data_dir().joinpath("mmio_trace.csv.gz").open("rb") as raw, \
            gzip.open(raw, "rt", encoding="utf-8", newline="") as fh:
        return _build(fh)


def _build(fh: io.TextIOBase) -> LinuxBootWorkload:
    try:
        counts, accesses = _read_rows(fh)
    except (OSError, EOFError) as exc:
        raise ScenarioError(f"mmio_trace.csv.gz: damaged or truncated ({exc})") from None
    memory = parse_mtree_flat(read_text("mtree_flat.txt"))
    iomem = parse_iomem(read_text("guest_iomem.txt"))
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
    conflicts = [MappingConflict(g, tuple(tuple(x) for x in h)) for g, h in sorted(history.items()) if len(h) > 1]
    initial = {g: h[0][0] for g, h in history.items()}
    tables = _build_page_tables(initial, direct_map)

    records, mmio_index, wide = _records(accesses, tables)
    notify = tuple(sorted({a.gpa for a in accesses if a.write and a.region.startswith("virtio-pci-notify")}))
    return LinuxBootWorkload(
        rows=counts["rows"], rows_by_kind=dict(counts["kind"]), rows_by_vcpu=dict(counts["vcpu"]),
        rows_by_phase_kind={p: dict(c) for p, c in counts["phase_kind"].items()},
        mmio_rows=counts["kind"]["mmio"], split_rows_merged=counts["merged"], memory=memory, page_tables=tables,
        initial_map=initial, conflicts=conflicts, problems=problems, records=records, mmio_index=mmio_index,
        notify_addrs=notify, wide_values=wide, iomem=iomem)


def _records(accesses: list[_Access], tables: PageTables) -> tuple[list[TraceRecord], list[int], int]:
    """The replayable stream: MMIO accesses, control registers where a vCPU's mode changes, and the
    guest's page-table updates where a gva page changes its mapping."""
    records: list[TraceRecord] = []
    mmio_index: list[int] = []
    mode: dict[int, bool] = {}                 # vCPU -> paging on?
    wide = 0
    current: dict[int, int] = {}
    kernel = {"cr0": KERNEL_CR0, "cr3": tables.cr3, "cr4": KERNEL_CR4, "efer": KERNEL_EFER}

    def regs(vcpu: int, paging: bool) -> dict[str, int]:
        if mode.get(vcpu) == paging:
            return {}
        mode[vcpu] = paging
        return dict(kernel) if paging else dict(FIRMWARE_REGS)

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
        value, w = _value(acc)
        wide += w
        mmio_index.append(len(records))
        records.append(TraceRecord(acc.vcpu, "write" if acc.write else "read", acc.gva, acc.size, value,
                                   acc.gpa, phase=acc.phase, region=acc.region, seq=acc.seq, line=acc.line,
                                   **regs(acc.vcpu, paging)))
    return records, mmio_index, wide


__all__ = [
    "DATASET", "FIRMWARE_PHASE", "IOAPIC_BASE", "LAPIC_BASE", "PROFILES", "CoalescedZone", "IoEventFd",
    "LinuxBootWorkload", "MappingConflict", "MemoryRange", "PageTables", "data_dir", "load_linux_boot",
    "parse_iomem", "parse_mtree_flat", "summary",
]
