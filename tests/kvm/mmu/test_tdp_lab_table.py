"""The 64-read MMIO program measured on a real KVM 6.1 (SVM with NPT, mmio_caching=1), docs/tdp-mmu.md
"Checked against a real KVM with MMIO caching on": the model must give the same counters.

The program, shaped like the lab's (the project's own guest runtime, CPL0, long mode):

    mov rdi, 0xd0000000 ; mov ecx, 64 ; l: mov eax, [rdi] ; loop l ; hlt

What RAM the guest touches under NPT (the CPU walks the guest's tables itself, every table access and
the final gpa going through KVM's NPT): the guest page-table pool holds six pages -- PML4 0x10000,
PDPT 0x11000, the PD of the first GiB 0x12000 and its PT for the first 2 MiB 0x13000 (which maps the
runtime and the text at 0x40000), the PD of the fourth GiB 0x14000 and the PT that maps 0xd0000000
0x15000 -- and the code is one page at 0x40000.  Nothing else is touched: no exception (IDT, TSS and
handlers stay cold), no push or call (the stack stays cold), no segment load (the GDT's descriptors
are in the segment caches KVM_SET_SREGS loaded).  So 7 RAM pages, each faulted in once, and one MMIO
page without a memslot.

- tdp_mmu=1: the TDP MMU maps exactly the faulting page (kvm_tdp_mmu_map has no prefetch), so each
  RAM page is one fault: pf_fixed 7, pages_4k 7; the first MMIO read is the 8th full fault
  (pf_taken 8), which installs the MMIO spte (pf_mmio_spte_created 1, mark_mmio_spte once) and is
  emulated (pf_emulate 1).  The other 63 reads exit with RSVD set and are answered by the per-vCPU
  MMIO cache (vcpu_match_mmio_gpa) before handle_mmio_page_fault looks at the spte: no more pf_*.
- tdp_mmu=0: the legacy MMU's __direct_pte_prefetch maps neighbours in the same 8-entry block when
  it installs a 4 KiB spte: the first fault (the PML4 at 0x10000) maps the whole table pool and the
  second (the code) the text, so pf_fixed 2 and pf_taken 3.  The real KVM maps only neighbours whose
  host pages are present (pages_4k 9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kvmmu.guest.runtime import Map, Program, build
from kvmmu.kvm.profiles import HostProfile
from kvmmu.kvm.vm import VM
from kvmmu.realdiff import run_model

MMIO = 0xD000_0000


def _program(reads: int) -> Program:
    return Program(name=f"mmio{reads}", maps=(Map(MMIO, 0x1000, flags="rw"),),
                   code=f"mov rdi, {MMIO:#x}\nmov ecx, {reads}\nl: mov eax, [rdi]\nloop l\nhlt")


@dataclass(frozen=True)
class _Svm(HostProfile):
    """A plain SVM/NPT host (every ring native) with the given kvm module parameters; the VMs it makes
    trace, and are kept in `made` for the test to inspect."""

    tdp_mmu: bool = True
    made: list = field(default_factory=list)

    def make_vm(self, host_hugepage_level: int = 1) -> VM:
        vm = VM(mmu=self.mmu, mmio_caching=self.mmio_caching, tdp_mmu=self.tdp_mmu, kvm_deviations=True,
                host_hugepage_level=host_hugepage_level)
        vm.trace.enable()
        self.made.append(vm)
        return vm


def _run(reads: int, tdp_mmu: bool, mmio_caching: str = "generation") -> tuple[dict, VM]:
    prof = _Svm(name=f"svm-npt-{'tdp' if tdp_mmu else 'legacy'}", summary="", mmu="npt",
                mmio_caching=mmio_caching, cpl0="native", delivery="hardware", tdp_mmu=tdp_mmu)
    obs = run_model(_program(reads), prof)
    assert obs.stops == ["hlt"]
    vm = prof.made[0]
    c = dict(obs.counters)
    names = vm.trace.names()
    c["mark_mmio_spte"] = names.count("mark_mmio_spte")
    c["handle_mmio_page_fault"] = names.count("handle_mmio_page_fault")
    c["rsvd_exits"] = sum(1 for e in vm.trace.events if e.name == "kvm_page_fault" and e.fields["error_code"] & 8)
    return c, vm


def test_the_derivation_of_the_programs_ram_pages() -> None:
    """The docstring's seven pages: the runtime's page-table pool holds exactly six tables here."""
    img = build(_program(64))
    tables = sorted(g for g in img.memory if 0x10000 <= g < 0x40000)
    assert tables == [0x10000, 0x11000, 0x12000, 0x13000, 0x14000, 0x15000]
    assert img.cr3 == 0x10000 and img.rip == 0x40000


@pytest.mark.parametrize("reads", [64, 1024])
def test_npt_tdp_mmu_column(reads: int) -> None:
    """Real KVM 6.1, npt=1 tdp_mmu=1: pf_taken 8 (also at 1024 reads), pf_fixed 7, pages_4k 7."""
    c, vm = _run(reads, True)
    assert {k: c[k] for k in ("mmio_exits", "pf_mmio_spte_created", "pf_emulate", "pf_taken", "pf_fixed", "pages_4k",
                              "mark_mmio_spte", "handle_mmio_page_fault", "rsvd_exits")} == {
        "mmio_exits": reads, "pf_mmio_spte_created": 1, "pf_emulate": 1, "pf_taken": 8, "pf_fixed": 7, "pages_4k": 7,
        "mark_mmio_spte": 1, "handle_mmio_page_fault": 0, "rsvd_exits": reads - 1}
    mapped = {e.fields["gfn"] for e in vm.trace.events if e.name == "kvm_mmu_set_spte"}
    assert mapped == {0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x40}         # the docstring's pages, nothing else
    vm.audit()


def test_npt_legacy_column_faults() -> None:
    """Real KVM 6.1, npt=1 tdp_mmu=0: pf_taken 3, pf_fixed 2 (prefetch maps the neighbours)."""
    c, vm = _run(64, False)
    assert {k: c[k] for k in ("mmio_exits", "pf_mmio_spte_created", "pf_emulate", "pf_taken", "pf_fixed",
                              "mark_mmio_spte", "handle_mmio_page_fault", "rsvd_exits")} == {
        "mmio_exits": 64, "pf_mmio_spte_created": 1, "pf_emulate": 1, "pf_taken": 3, "pf_fixed": 2,
        "mark_mmio_spte": 1, "handle_mmio_page_fault": 0, "rsvd_exits": 63}
    vm.audit()


@pytest.mark.xfail(strict=False, reason="the legacy prefetch maps every neighbour in the slot; KVM maps only "
                   "those whose host pages are present (modelled on another branch)")
def test_npt_legacy_column_pages() -> None:
    """Real KVM 6.1, npt=1 tdp_mmu=0: pages_4k 9."""
    c, _ = _run(64, False)
    assert c["pages_4k"] == 9


@pytest.mark.parametrize("tdp_mmu", [True, False])
def test_without_mmio_caching_every_access_is_a_full_fault(tdp_mmu: bool) -> None:
    """Measured with mmio_caching=0: pf_emulate 64, no MMIO spte, no RSVD exit."""
    c, _ = _run(64, tdp_mmu, "off")
    assert (c["pf_emulate"], c["pf_mmio_spte_created"], c["rsvd_exits"], c["mark_mmio_spte"]) == (64, 0, 0, 0)
