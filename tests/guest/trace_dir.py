"""A synthetic recorded-boot directory, written from the format rules of docs/workloads.md
("Recorded trace directories") and QEMU's conventions for a q35 machine, not copied from the shipped
recording: `write_trace_dir(path)` writes a 4-vCPU q35-like machine's memory map, /proc/iomem, README
and an MMIO trace, and returns what a reader must find in them (`Expected`).

The trace follows the rules a recording VMM obeys: firmware accesses run with paging off (gva ==
gpa); the kernel reaches the LAPIC through the fixmap (0xffffffffff5fd000), the IOAPIC at
0xffffffffff5fc000, PCI BARs through ioremap and the VGA text buffer through the direct map; a CPU
access wider than its region is logged as several rows of the same pc with consecutive addresses,
each carrying the access's `cpu_size`; vCPU -1 is the VMM's own thread (MSI writes by a device); an
ioremap'd gva page may be unmapped and reused for another device page later.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass, field
from pathlib import Path

HEADER = ["seq", "vcpu", "kind", "is_write", "addr", "size", "value", "region", "pc", "gva", "cpu_size", "phase"]
LAPIC, IOAPIC, HPET = 0xFEE00000, 0xFEC00000, 0xFED00000
FIXMAP_LAPIC, FIXMAP_IOAPIC = 0xFFFFFFFFFF5FD000, 0xFFFFFFFFFF5FC000
IOREMAP = 0xFFFFC90000000000
DIRECT_MAP = 0xFFFF888000000000
VIRTIO_BAR = 0xFE000000                       # one virtio-pci-modern device: common, isr, device, notify pages
VGA_TEXT = 0xB8000

# (start, last byte, kind, name) of the flat view serving AS "memory": q35 with 3 GiB of RAM (2 GiB
# below the 32-bit PCI hole, the rest from 4 GiB), PCIe MMCONFIG at 0xb0000000, the BIOS ROM at the top.
SECTIONS = [
    (0x0, 0x9FFFF, "ram", "pc.ram"),
    (0xA0000, 0xBFFFF, "i/o", "vga-lowmem"),
    (0xC0000, 0xDFFFF, "rom", "pc.rom"),
    (0xE0000, 0xFFFFF, "rom", "isa-bios"),
    (0x100000, 0x7FFFFFFF, "ram", "pc.ram @0000000000100000"),
    (0xB0000000, 0xBFFFFFFF, "i/o", "pcie-mmcfg-mmio"),
    (VIRTIO_BAR, VIRTIO_BAR + 0xFFF, "i/o", "virtio-pci-common-virtio-net"),
    (VIRTIO_BAR + 0x1000, VIRTIO_BAR + 0x1FFF, "i/o", "virtio-pci-isr-virtio-net"),
    (VIRTIO_BAR + 0x2000, VIRTIO_BAR + 0x2FFF, "i/o", "virtio-pci-device-virtio-net"),
    (VIRTIO_BAR + 0x3000, VIRTIO_BAR + 0x3FFF, "i/o", "virtio-pci-notify-virtio-net"),
    (IOAPIC, IOAPIC + 0xFFF, "i/o", "ioapic"),
    (HPET, HPET + 0x3FF, "i/o", "hpet"),
    (LAPIC, LAPIC + 0xFFFFF, "i/o", "apic-msi"),
    (0xFFFC0000, 0xFFFFFFFF, "rom", "pc.bios"),
    (0x100000000, 0x13FFFFFFF, "ram", "pc.ram @0000000080000000"),
]

IOMEM = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
0009fc00-0009ffff : Reserved
000a0000-000bffff : PCI Bus 0000:00
000c0000-000dffff : Video ROM
000f0000-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-7fffffff : System RAM
  01000000-01e01fff : Kernel code
b0000000-bfffffff : PCI MMCONFIG 0000 [bus 00-ff]
fe000000-fe003fff : 0000:00:02.0
  fe000000-fe003fff : virtio-pci-modern
fec00000-fec003ff : IOAPIC 0
fed00000-fed003ff : HPET 0
fee00000-fee00fff : Local APIC
fffc0000-ffffffff : Reserved
100000000-13fffffff : System RAM
"""


@dataclass
class Expected:
    """What the directory holds, counted while writing it."""

    machine: str
    nr_vcpus: int
    memslots: list[tuple[int, int, str]]            # (start, end exclusive, "ram" | "rom")
    rows: int = 0
    rows_by_kind: dict[str, int] = field(default_factory=dict)
    accesses: int = 0                               # CPU accesses to MMIO (split rows count once)
    merged_rows: int = 0                            # rows that continued a split access
    in_kernel: int = 0                              # of them: LAPIC or IOAPIC (KVM's in-kernel irqchip)
    to_vmm_by_vcpu: dict[int, int] = field(default_factory=dict)   # the others: KVM_EXIT_MMIO, per vCPU
    phases: list[str] = field(default_factory=list)
    remapped: list[int] = field(default_factory=list)   # gva pages ioremapped to a second gpa page later


class _Writer:
    def __init__(self, exp: Expected) -> None:
        self.exp = exp
        self.out: list[list[str]] = []
        self.pc = 0x1000

    def row(self, vcpu: int, kind: str, write: bool, addr: int, size: int, value: int | None, region: str,
            phase: str, gva: int | None = None, cpu_size: int | None = None, pc: int | None = None) -> None:
        self.exp.rows += 1
        self.exp.rows_by_kind[kind] = self.exp.rows_by_kind.get(kind, 0) + 1
        if phase not in self.exp.phases:
            self.exp.phases.append(phase)
        self.out.append([str(len(self.out)), str(vcpu), kind, "1" if write else "0", f"{addr:x}", str(size),
                         "" if value is None else f"{value:x}", region, "" if pc is None else f"{pc:x}",
                         "" if gva is None else f"{gva:x}", "" if cpu_size is None else str(cpu_size), phase])

    def mmio(self, vcpu: int, write: bool, gpa: int, gva: int, size: int, value: int, region: str, phase: str,
             piece: int | None = None) -> None:
        """One CPU access; `piece` < size: logged as size // piece rows, as a recording VMM splits it."""
        self.pc += 7
        piece = piece or size
        for i in range(size // piece):
            part = (value >> (8 * piece * i)) & ((1 << (8 * piece)) - 1)
            self.row(vcpu, "mmio", write, gpa + i * piece, piece, part, region, phase, gva + i * piece, size, self.pc)
        self.exp.accesses += 1
        self.exp.merged_rows += size // piece - 1
        if LAPIC <= gpa < LAPIC + 0x1000 or IOAPIC <= gpa < IOAPIC + 0x100:
            self.exp.in_kernel += 1
        else:
            self.exp.to_vmm_by_vcpu[vcpu] = self.exp.to_vmm_by_vcpu.get(vcpu, 0) + 1


def _mtree(nr_vcpus: int) -> str:
    lines = ["FlatView #0", ' AS "I/O", root: io', " Root memory region: io",
             "  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan",
             "  0000000000000cf8-0000000000000cfb (prio 0, i/o): pci-conf-idx", "",
             "FlatView #1", ' AS "memory", root: system',
             *[f' AS "cpu-memory-{i}", root: system' for i in range(nr_vcpus)], " Root memory region: system"]
    lines += [f"  {a:016x}-{b:016x} (prio 0, {k}): {n}" for a, b, k, n in SECTIONS]
    return "\n".join(lines) + "\n\n"


def write_trace_dir(path: Path, nr_vcpus: int = 4, machine: str = "Synthetic q35 machine, 4 vCPUs, 3 GiB",
                    compress: bool = True) -> Expected:
    path.mkdir(parents=True, exist_ok=True)
    exp = Expected(machine, nr_vcpus, [(a, b + 1, k) for a, b, k, _ in SECTIONS if k in ("ram", "rom")])
    w = _Writer(exp)
    w.row(-1, "dev", True, LAPIC, 4, 0, "apic-msi", "firmware")                   # the VMM's own thread
    w.row(0, "pio", True, 0x70, 1, 0x8F, "rtc-index", "firmware", pc=0xFEC16)
    w.mmio(0, False, LAPIC + 0x30, LAPIC + 0x30, 4, 0x50014, "apic", "firmware")        # LAPIC version
    w.mmio(0, False, HPET, HPET, 8, 0x8086A201_00989680, "hpet", "firmware", piece=4)   # split 8-byte read
    for v in range(nr_vcpus):
        w.mmio(v, False, LAPIC + 0x20, FIXMAP_LAPIC + 0x20, 4, v << 24, "apic", "kernel-boot")   # APIC ID
        w.mmio(v, True, LAPIC + 0xF0, FIXMAP_LAPIC + 0xF0, 4, 0x1FF, "apic", "kernel-boot")      # SVR
        w.mmio(v, True, LAPIC + 0xB0, FIXMAP_LAPIC + 0xB0, 4, 0, "apic", "kernel-boot")          # EOI
        w.row(v, "pio", False, 0x3F8 + 5, 1, 0x60, "serial", "kernel-boot", pc=0x2000 + v)
    w.mmio(0, True, IOAPIC, FIXMAP_IOAPIC, 4, 0x10, "ioapic", "kernel-boot")            # IOREGSEL
    w.mmio(0, False, IOAPIC + 0x10, FIXMAP_IOAPIC + 0x10, 4, 0x170011, "ioapic", "kernel-boot")
    # An ioremap that is unmapped and reused: the same gva page reaches the HPET, later a virtio page.
    w.mmio(1, False, HPET + 0xF0, IOREMAP + 0x5000 + 0xF0, 4, 0x1234, "hpet", "kernel-boot")
    exp.remapped.append(IOREMAP + 0x5000)
    for i, ch in enumerate(b"OK"):                                                       # VGA text, 2-byte stores
        gpa = VGA_TEXT + 2 * i
        w.mmio(0, True, gpa, DIRECT_MAP + gpa, 2, 0x0700 | ch, "vga-lowmem", "kernel-boot", piece=1)
    for v in range(nr_vcpus):                                                            # every vCPU's queue
        w.mmio(v, True, VIRTIO_BAR + 0x16, IOREMAP + 0x16, 2, v, "virtio-pci-common-virtio-net", "devices-probed")
        w.mmio(v, False, VIRTIO_BAR + 0x1000, IOREMAP + 0x1000, 1, 1, "virtio-pci-isr-virtio-net", "devices-probed")
        w.mmio(v, True, VIRTIO_BAR + 0x3000 + 4 * v, IOREMAP + 0x3000 + 4 * v, 2, v,
               "virtio-pci-notify-virtio-net", "devices-probed")
        w.row(-1, "dev", True, LAPIC, 4, 0x41 + v, "apic-msi", "devices-probed")
    w.mmio(2, False, VIRTIO_BAR + 0x2000 + 0xF0, IOREMAP + 0x5000 + 0xF0, 4, 0x5678, "virtio-pci-device-virtio-net",
           "devices-probed")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(w.out)
    data = buf.getvalue().encode()
    if compress:
        (path / "mmio_trace.csv.gz").write_bytes(gzip.compress(data, mtime=0))
    else:
        (path / "mmio_trace.csv").write_bytes(data)
    (path / "mtree_flat.txt").write_text(_mtree(nr_vcpus))
    (path / "guest_iomem.txt").write_text(IOMEM)
    (path / "README.md").write_text(f"# {machine}\n\nWritten by tests/guest/trace_dir.py for the test suite.\n")
    return exp
