"""Any recorded trace directory of the shipped format replays, with its own memory map, iomem, vCPU
count and machine name: a synthetic 4-vCPU q35-like directory (tests/guest/trace_dir.py, written from
the format rules) through `load_linux_boot(DIR)`, the replay and `kvmmu linux-boot --trace DIR`.

Expected values come from the directory as written: the memslots are its mtree's ram/rom sections,
the vCPUs its cpu-memory-N address spaces, the accesses its rows with split rows merged; which
accesses stay in the kernel follows KVM's in-kernel irqchip (the LAPIC page at 0xfee00000 and the
IOAPIC's 0x100 bytes at 0xfec00000, `apic_mmio_in_range` / IOAPIC_MEM_LENGTH), every other one is
one KVM_EXIT_MMIO (`mmio_exits`) on the vCPU that made it.
"""

from __future__ import annotations

import pytest

from kvmmu.cli import main
from kvmmu.guest.linux_boot import load_linux_boot
from kvmmu.guest.trace import replay
from kvmmu.report.linux_boot import format_linux_boot, run_linux_boot

from .trace_dir import write_trace_dir


@pytest.fixture(scope="module")
def q35(tmp_path_factory):
    path = tmp_path_factory.mktemp("q35-smp4")
    return path, write_trace_dir(path)


def test_the_directory_is_read_not_the_package(q35) -> None:
    path, exp = q35
    w = load_linux_boot(path)
    assert w.nr_vcpus == exp.nr_vcpus == 4
    assert [(r.start, r.end, r.kind) for r in w.memory] == exp.memslots
    assert w.machine == exp.machine and w.source == str(path)
    assert w.rows == exp.rows and w.rows_by_kind == exp.rows_by_kind
    assert w.mmio_accesses == exp.accesses and w.split_rows_merged == exp.merged_rows
    assert w.phases == exp.phases
    assert any(name == "System RAM" and start == 0x100000000 for start, _, name, _ in w.iomem)
    assert w.problems == []
    assert [c.gva_page for c in w.conflicts] == exp.remapped


def test_the_mmio_trace_file_path_means_its_directory(q35) -> None:
    path, exp = q35
    assert load_linux_boot(path / "mmio_trace.csv.gz").nr_vcpus == exp.nr_vcpus


def test_an_uncompressed_trace_is_read_too(tmp_path) -> None:
    exp = write_trace_dir(tmp_path, compress=False)
    assert load_linux_boot(tmp_path).mmio_accesses == exp.accesses


@pytest.mark.parametrize("flavour", ["shadow", "ept"])
def test_every_vcpu_replays_its_own_accesses(q35, flavour) -> None:
    path, exp = q35
    w = load_linux_boot(path)
    setup = w.setup(flavour, "generation")
    assert len(setup.vcpus) == 4
    res = replay(setup, w.records)
    assert res.total.mmio_accesses == exp.accesses
    assert res.fault_count == 0 and res.mismatch_count == 0 and res.misrouted == 0 and res.undelivered == 0
    assert res.values_checked > 0
    assert {i: v.stats["mmio_exits"] for i, v in enumerate(setup.vcpus)} == exp.to_vmm_by_vcpu
    assert res.total.counters["iobus_handled"] == exp.in_kernel
    # the remap: iounmap's TLB flush reaches every vCPU running with paging (all four by then)
    assert res.total.invlpgs == 4 * len(exp.remapped)


def test_the_report_names_the_machine_it_came_from(q35) -> None:
    path, exp = q35
    text = format_linux_boot(run_linux_boot(("ept",), ("generation",), workload=load_linux_boot(path)))
    assert f"Workload: {exp.machine} (recorded trace {path}, 4 vCPUs" in text
    assert "Every read returned the recorded value" in text


def test_kvmmu_linux_boot_trace_dir(q35, capsys) -> None:
    path, exp = q35
    assert main(["linux-boot", "--trace", str(path), "--mmu", "shadow", "--policy", "off,generation", "-q"]) == 0
    out = capsys.readouterr().out
    assert exp.machine in out and "4 vCPUs" in out and "shadow/generation" in out


def test_a_directory_without_a_name_is_named_by_its_folder(tmp_path) -> None:
    write_trace_dir(tmp_path / "my-boot")
    (tmp_path / "my-boot" / "README.md").unlink()
    assert load_linux_boot(tmp_path / "my-boot").machine == "my-boot"


def test_without_cpu_address_spaces_the_vcpus_are_those_the_rows_name(tmp_path) -> None:
    write_trace_dir(tmp_path, nr_vcpus=3)
    mtree = tmp_path / "mtree_flat.txt"
    mtree.write_text("\n".join(x for x in mtree.read_text().splitlines() if "cpu-memory" not in x) + "\n")
    assert load_linux_boot(tmp_path).nr_vcpus == 3
