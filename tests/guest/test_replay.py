"""replay(): a recorded access stream runs on the vCPUs of a VM the caller built; devices answer with the
recorded values; per-phase counters are KVM's (spec §3.2, §3.3, §3.12)."""

from __future__ import annotations

import io

import pytest

import kvmmu
from kvmmu import ScenarioError
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.guest.pagetables import RW, GuestPageTables, P, vm_writer
from kvmmu.guest.trace import ReplaySetup, read_trace, replay

DEV = 0xFEB00000          # no memslot: MMIO exiting to the VMM
KDEV = 0xFEC00000         # no memslot: an in-kernel device
IO = 0xFFFFC90000000000   # where the guest maps them
CR0 = X86_CR0_PG | X86_CR0_PE | X86_CR0_WP
REGS = f'"cr0": "{CR0:#x}", "cr4": "{X86_CR4_PAE:#x}", "efer": "{EFER_LME | EFER_NX:#x}"'


def machine(flavour: str = "shadow", policy: str = "generation") -> tuple[ReplaySetup, GuestPageTables]:
    vm = kvmmu.VM(mmu=flavour, mmio_caching=policy)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=0x100000)
    pt.map(IO, DEV, 4096, P | RW)
    pt.map(IO + 0x1000, DEV + 0x1000, 4096, P | RW)
    pt.map(IO + 0x2000, KDEV, 4096, P | RW)
    setup = ReplaySetup(vm, [vm.create_vcpu(), vm.create_vcpu()])
    vm.register_io_device(KDEV, 0x100, setup.values)
    return setup, pt


def trace(pt: GuestPageTables, *lines: str) -> list:
    first = lines[0].replace("}", f', {REGS}, "cr3": "{pt.cr3:#x}"}}', 1)
    return list(read_trace(io.StringIO("\n".join([first, *lines[1:]]) + "\n")))


@pytest.mark.parametrize("flavour", ["shadow", "ept"])
def test_reads_return_the_recorded_values_and_writes_reach_the_vmm(flavour: str) -> None:
    """§3.12: an MMIO read exits to the VMM (KVM_EXIT_MMIO), whose answer is what the guest sees; the
    oracle answers with the recorded value, so the guest reads what the recorded guest read."""
    setup, pt = machine(flavour)
    recs = trace(pt,
                 f'{{"vcpu": 0, "op": "read", "gva": "{IO + 0x10:#x}", "size": 4, "value": "0xcafe", '
                 f'"gpa": "{DEV + 0x10:#x}", "region": "dev", "phase": "a"}}',
                 f'{{"vcpu": 0, "op": "write", "gva": "{IO + 0x20:#x}", "size": 8, "value": "0x1122334455667788", '
                 f'"gpa": "{DEV + 0x20:#x}", "region": "dev", "phase": "a"}}',
                 f'{{"vcpu": 0, "op": "read", "gva": "{IO + 0x30:#x}", "size": 2, "value": "0xbeef", '
                 f'"region": "dev", "phase": "b"}}')
    r = replay(setup, recs)
    assert (r.fault_count, r.mismatch_count, r.values_checked, r.misrouted, r.undelivered) == (0, 0, 2, 0, 0)
    log = setup.vm.mmio_log
    assert [(e.phys_addr, e.len, e.is_write, e.value) for e in log] == [
        (DEV + 0x10, 4, False, 0xCAFE), (DEV + 0x20, 8, True, 0x1122334455667788), (DEV + 0x30, 2, False, 0xBEEF)]
    assert [p.phase for p in r.phases] == ["a", "b"]
    assert (r.phase("a").accesses, r.phase("a").mmio_accesses, r.phase("b").reads) == (2, 2, 1)
    assert r.total.counters["userspace_exits"] == 3 and r.total.stats["mmio_exits"] == 3


def test_a_page_crossing_read_gets_its_bytes_from_both_pages() -> None:
    """§3.12: a 16-byte access that crosses a page is two fragments, each exits in <= 8-byte pieces; the
    pieces are put back together in order, so the guest sees the recorded 16 bytes."""
    setup, pt = machine()
    value = 0x00112233445566778899AABBCCDDEEFF
    recs = trace(pt, f'{{"vcpu": 0, "op": "read", "gva": "{IO + 0xFF8:#x}", "size": 16, "value": "{value:#x}", '
                     f'"gpa": "{DEV + 0xFF8:#x}", "region": "dev"}}')
    r = replay(setup, recs)
    assert (r.fault_count, r.mismatch_count, r.misrouted) == (0, 0, 0)
    assert [(e.phys_addr, e.len) for e in setup.vm.mmio_log] == [(DEV + 0xFF8, 8), (DEV + 0x1000, 8)]


def test_in_kernel_device_completes_without_an_exit() -> None:
    """§3.12 step 4: an access the io bus handles completes in the kernel: no KVM_EXIT_MMIO."""
    setup, pt = machine()
    recs = trace(pt, f'{{"vcpu": 1, "op": "read", "gva": "{IO + 0x2010:#x}", "size": 4, "value": "0x11", '
                     f'"gpa": "{KDEV + 0x10:#x}", "region": "ioapic"}}',
                 f'{{"vcpu": 1, "op": "write", "gva": "{IO + 0x2000:#x}", "size": 4, "value": "0x3", '
                 f'"gpa": "{KDEV:#x}", "region": "ioapic"}}')
    r = replay(setup, recs)
    assert (r.mismatch_count, r.write_mismatches, r.misrouted) == (0, 0, 0)
    assert list(setup.vm.mmio_log) == []
    assert r.total.counters["iobus_handled"] == 2 and r.total.counters.get("userspace_exits", 0) == 0


def test_generation_caches_the_mmio_translation_after_the_first_access() -> None:
    """§3.3/§3.9: the first access to an MMIO page takes the full path and installs an MMIO spte; the next
    accesses to that page are resolved by the fast path (no pf_taken)."""
    setup, pt = machine()
    lines = [f'{{"vcpu": 0, "op": "read", "gva": "{IO + 4 * i:#x}", "size": 4, "value": "{i:#x}", '
             f'"region": "dev"}}' for i in range(10)]
    r = replay(setup, trace(pt, *lines))
    assert r.total.stats["pf_taken"] == r.total.stats["pf_mmio_spte_created"] == 1
    assert r.total.mmio_full_path == 1 and r.total.mmio_accesses == 10
    assert r.mismatch_count == 0


def test_a_read_that_differs_from_the_recording_is_reported() -> None:
    """If what the guest sees is not the recorded value (here the VMM answers on its own), the replay says
    which record and what was seen."""
    setup, pt = machine()
    setup.vm.mmio_handler = lambda exit_: 7
    recs = trace(pt, f'{{"vcpu": 0, "op": "read", "gva": "{IO:#x}", "size": 4, "value": "0x5", "seq": 9}}')
    r = replay(setup, recs)
    assert r.mismatch_count == 1 and r.value_mismatches == [(1, 9, 5, 7)]


def test_invlpg_and_cr3_records_drive_the_vcpu() -> None:
    """An invlpg record is the guest's INVLPG (intercepted under shadow paging: stats invlpg); a cr3 field
    that changes is the guest's MOV to CR3."""
    setup, pt = machine()
    recs = trace(pt, f'{{"vcpu": 0, "op": "read", "gva": "{IO:#x}", "size": 4}}',
                 f'{{"vcpu": 0, "op": "invlpg", "gva": "{IO:#x}"}}',
                 f'{{"vcpu": 0, "op": "read", "gva": "{IO:#x}", "size": 4, "cr3": "{pt.cr3:#x}"}}')
    r = replay(setup, recs)
    assert r.total.stats["invlpg"] == 1 and r.total.invlpgs == 1
    assert setup.vcpus[0].cr3 == pt.cr3 and setup.vcpus[0].cr0 == CR0


def test_a_record_for_a_missing_vcpu_is_a_scenario_error() -> None:
    """The records' vcpu indexes the setup's vCPUs; a larger index names the line and the field."""
    setup, pt = machine()
    recs = trace(pt, f'{{"vcpu": 0, "op": "read", "gva": "{IO:#x}", "size": 4}}',
                 f'{{"vcpu": 2, "op": "read", "gva": "{IO:#x}", "size": 4}}')
    with pytest.raises(ScenarioError, match=r"line 2: vcpu=2: the VM has 2 vCPUs"):
        replay(setup, recs)


def test_limit_counts_accesses() -> None:
    setup, pt = machine()
    lines = [f'{{"vcpu": 0, "op": "read", "gva": "{IO + 4 * i:#x}", "size": 4}}' for i in range(10)]
    assert replay(setup, trace(pt, *lines), limit=4).total.accesses == 4


def test_a_record_built_with_a_negative_vcpu_is_refused_not_run_on_the_last_vcpu() -> None:
    from kvmmu.guest.trace import TraceRecord
    setup, _ = machine()
    with pytest.raises(ScenarioError, match=r"vcpu=-1: the VM has 2 vCPUs"):
        replay(setup, [TraceRecord(-1, "read", IO, 4)])
    assert setup.vcpus[1].stats["exits"] == 0
