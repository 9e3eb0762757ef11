"""The Linux-boot loader against independent sources: the recorder's summary.json (row counts), the
guest's own /proc/iomem (memory map), and the raw CSV read here with the csv module (accesses, values,
the gva -> gpa mapping the guest used)."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections import Counter, defaultdict

import pytest

from kvmmu.arch.bits import X86_CR0_PG
from kvmmu.guest.linux_boot import (
    FIRMWARE_PHASE,
    IOAPIC_BASE,
    LAPIC_BASE,
    LinuxBootWorkload,
    data_dir,
    load_linux_boot,
    parse_iomem,
)
from kvmmu.guest.pagetables import NX, PCD, RW, US, P


@pytest.fixture(scope="module")
def w() -> LinuxBootWorkload:
    return load_linux_boot()


@pytest.fixture(scope="module")
def summary() -> dict:
    return json.loads(data_dir().joinpath("summary.json").read_text())


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    raw = data_dir().joinpath("mmio_trace.csv.gz").read_bytes()
    return list(csv.DictReader(io.StringIO(gzip.decompress(raw).decode())))


def test_the_data_set_ships_inside_the_package() -> None:
    """The loader needs nothing outside the installed package."""
    names = {p.name for p in data_dir().iterdir()}
    assert {"mmio_trace.csv.gz", "mtree_flat.txt", "guest_iomem.txt", "summary.json", "README.md"} <= names


def test_row_counts_per_kind_match_summary(w: LinuxBootWorkload, summary: dict) -> None:
    """Every row is counted once, by kind, by vCPU and by phase, as the recorder's summary.json says."""
    assert w.rows == summary["records"]
    assert w.rows_by_kind == summary["by_kind"]
    assert {str(k): v for k, v in w.rows_by_vcpu.items()} == summary["by_vcpu"]
    flat = {f"{p}/{k}": n for p, c in w.rows_by_phase_kind.items() for k, n in c.items()}
    assert flat == summary["by_phase_kind"]
    assert w.mmio_rows == summary["by_kind"]["mmio"] == summary["mmio_with_gva"]


def test_phases_are_in_log_order(w: LinuxBootWorkload) -> None:
    assert w.phases == ["firmware", "kernel-boot", "init-start", "devices-probed", "workload-start",
                        "workload-end", "trace-end", "poweroff"]


def test_split_rows_are_merged_into_cpu_accesses(w: LinuxBootWorkload, rows: list[dict[str, str]]) -> None:
    """A CPU access wider than its region was logged as several rows (size < cpu_size); KVM sees one access
    of cpu_size bytes.  Bytes are conserved and each access starts at its first row."""
    mmio = [r for r in rows if r["kind"] == "mmio"]
    by_seq = {int(r["seq"]): r for r in mmio}
    accesses = [w.records[i] for i in w.mmio_index]
    assert sum(a.size for a in accesses) == sum(int(r["size"]) for r in mmio)
    assert len(accesses) == len(mmio) - w.split_rows_merged
    assert len(accesses) == sum(int(r["size"]) / int(r["cpu_size"]) for r in mmio)
    for a in accesses:
        r = by_seq[a.seq]
        assert (a.vcpu, a.op, a.gva, a.gpa, a.size, a.phase, a.region) == (
            int(r["vcpu"]), "write" if r["is_write"] == "1" else "read", int(r["gva"], 16), int(r["addr"], 16),
            int(r["cpu_size"]), r["phase"], r["region"])


def test_values_are_what_the_cpu_saw(w: LinuxBootWorkload, rows: list[dict[str, str]]) -> None:
    """An access's value is its rows' values, little-endian in address order, each cut to its row size (the
    recorder logged some 4-byte HPET reads with the whole 64-bit register; the CPU got the low 4 bytes).
    Virtio notify writes completed by an ioeventfd were logged without a value."""
    mmio = [r for r in rows if r["kind"] == "mmio"]
    wide = sum(1 for r in mmio if r["value"] and int(r["value"], 16) >> (8 * int(r["size"])))
    assert w.wide_values == wide > 0
    pieces: dict[tuple[int, int], list[dict[str, str]]] = defaultdict(list)
    open_: dict[int, tuple[int, int]] = {}
    for r in mmio:
        v, size, cpu = int(r["vcpu"]), int(r["size"]), int(r["cpu_size"])
        key = open_.get(v) or (v, int(r["seq"]))
        pieces[key].append(r)
        done = sum(int(x["size"]) for x in pieces[key])
        if size < cpu and done < cpu:
            open_[v] = key
        else:
            open_.pop(v, None)
    for a in (w.records[i] for i in w.mmio_index):
        group = pieces[(a.vcpu, a.seq)]
        if any(r["value"] == "" for r in group):
            assert a.value is None and a.region.startswith("virtio-pci-notify")
            continue
        expect, shift = 0, 0
        for r in sorted(group, key=lambda r: int(r["addr"], 16)):
            size = int(r["size"])
            expect |= (int(r["value"], 16) & ((1 << (8 * size)) - 1)) << shift
            shift += 8 * size
        assert a.value == expect


def test_memslots_follow_the_guest_memory_map(w: LinuxBootWorkload) -> None:
    """Memslots are the RAM/ROM of the PC: /proc/iomem's System RAM lies in RAM slots, its ROMs in read-only
    slots, and no slot covers a device the guest saw (IOAPIC, HPET, LAPIC, the PCI BARs of its devices)."""
    iomem = parse_iomem(data_dir().joinpath("guest_iomem.txt").read_text())
    ram = [r for r in w.memory if r.kind == "ram"]
    rom = [r for r in w.memory if r.kind == "rom"]
    for start, end, name, _ in iomem:
        inside = [r for r in w.memory if r.start <= start and end <= r.end]
        if name == "System RAM":
            assert any(r in ram for r in inside), name
        elif name in ("Video ROM", "System ROM"):
            assert any(r in rom for r in inside), name
        elif name in ("IOAPIC 0", "HPET 0", "Local APIC", "nvme", "virtio-pci-modern"):
            assert not any(r.start < end and start < r.end for r in w.memory), name
    assert all(r.flags == 2 for r in rom) and all(r.flags == 0 for r in ram)
    below_hole = [r for r in w.memory if r.end <= 0x20000000]
    assert max(r.end for r in below_hole) == 0x20000000      # 512 MiB of RAM below the PCI hole
    assert not any(r.start <= 0xA0000 < r.end for r in w.memory)   # the VGA window is MMIO


def test_no_consistency_problems(w: LinuxBootWorkload) -> None:
    """Page offsets of gva and gpa agree, firmware runs with paging off (gva == gpa), no MMIO row hits RAM."""
    assert w.problems == []


def _walk(pages: dict[int, bytearray], cr3: int, gva: int) -> tuple[int, int]:
    """A 4-level walk of the built tables: (gpa, leaf entry)."""
    table = cr3
    entry = 0
    for level in (4, 3, 2, 1):
        index = (gva >> (12 + 9 * (level - 1))) & 511
        entry = int.from_bytes(pages[table][8 * index:8 * index + 8], "little")
        assert entry & P, f"{gva:#x} not present at level {level}"
        assert level == 1 or not entry & 0x80
        table = entry & 0x000FFFFFFFFFF000
    return table | (gva & 0xFFF), entry


def test_every_recorded_translation_holds_when_it_is_used(w: LinuxBootWorkload, rows: list[dict[str, str]]) -> None:
    """Walking the guest's tables gives, for every kernel access, the gpa the real guest used, at the time
    it used it: the loader's page-table stores (its remap events) are applied in order while walking."""
    pages = {gpa: bytearray(data) for gpa, data in w.page_tables.pages.items()}
    cr3 = w.page_tables.cr3
    for rec in w.records:
        if rec.region is None:                  # the guest's own store into a page table
            if rec.op == "write":
                page = pages[rec.gpa & ~0xFFF]
                page[rec.gpa & 0xFFF:(rec.gpa & 0xFFF) + 8] = rec.value.to_bytes(8, "little")
            continue
        if rec.phase == FIRMWARE_PHASE:
            assert rec.gva == rec.gpa
            continue
        gpa, leaf = _walk(pages, cr3, rec.gva)
        assert gpa == rec.gpa, f"seq {rec.seq}: {rec.gva:#x} -> {gpa:#x}, recorded {rec.gpa:#x}"
        assert leaf & (P | RW | NX | PCD) == P | RW | NX | PCD and not leaf & US     # Linux's ioremap PTE


def test_mapping_conflicts_are_those_of_the_raw_rows(w: LinuxBootWorkload, rows: list[dict[str, str]]) -> None:
    """A gva page the kernel used for more than one gpa page (iounmap, then ioremap of another device at the
    same address) is reported with its mappings in time order."""
    seen: dict[int, list[int]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "mmio" and r["phase"] != FIRMWARE_PHASE:
            g, a = int(r["gva"], 16) >> 12 << 12, int(r["addr"], 16) >> 12 << 12
            if not seen[g] or seen[g][-1] != a:
                seen[g].append(a)
    expect = {g: m for g, m in seen.items() if len(m) > 1}
    assert {c.gva_page: [g for g, _, _ in c.mappings] for c in w.conflicts} == expect
    assert len(expect) == 1                      # this boot reuses one ioremap address
    remaps = [r for r in w.records if r.region is None]
    (c,) = w.conflicts
    assert [(r.op, r.vcpu) for r in remaps] == [("write", 1), ("invlpg", 1), ("invlpg", 0), ("write", 1)]
    assert remaps[0].value == 0 and remaps[-1].value & 0x000FFFFFFFFFF000 == c.mappings[1][0]


def test_control_registers_switch_paging_on_for_the_kernel(w: LinuxBootWorkload) -> None:
    """Each vCPU's first record carries its control registers; vCPU 0 starts with paging off and switches
    once, at its first kernel access; vCPU 1 only ever runs the kernel."""
    with_regs = [(r.vcpu, r.phase, bool(r.cr0 & X86_CR0_PG)) for r in w.records if r.has_sregs]
    assert with_regs == [(0, "firmware", False), (0, "kernel-boot", True), (1, "kernel-boot", True)]


def test_in_kernel_devices_are_the_irqchip(w: LinuxBootWorkload) -> None:
    """The LAPIC and IOAPIC rows are the ones KVM's in-kernel irqchip serves."""
    regions = Counter(w.records[i].region for i in w.mmio_index if w.in_kernel(w.records[i].gpa))
    assert set(regions) == {"apic-msi", "ioapic"}
    assert w.in_kernel(LAPIC_BASE + 0x300) and w.in_kernel(IOAPIC_BASE + 0x10)
    assert not w.in_kernel(IOAPIC_BASE + 0x100) and not w.in_kernel(0xFED00000)


def test_the_workload_exports_as_a_valid_trace(w: LinuxBootWorkload) -> None:
    """The loader's records are records of the trace format: written out and read back they are the same
    (line numbers aside), remap events included."""
    from kvmmu.guest.trace import read_trace, trace_text

    recs = [*w.records_upto(2000), *(r for r in w.records if r.region is None)]
    back = list(read_trace(io.StringIO(trace_text(recs))))
    assert [r.to_json() for r in back] == [r.to_json() for r in recs]
