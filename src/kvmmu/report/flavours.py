"""One guest workload under shadow paging, EPT, NPT and nested EPT (as L2), side by side.

The workload is the driver loop of `experiments.py` (RAM accesses, a doorbell write, a status read
on another device page).  Under nested EPT the same loop runs as L2: L1 maps L2's physical memory
with its own EPT tables (L2 RAM at L1 gpa 64 MiB, the device at an L1 gpa without a memslot), so
KVM shadows L1's EPT and every L2 fault arrives with an L2 physical address.
"""

from __future__ import annotations

from collections.abc import Callable

from ..arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from ..guest.pagetables import GuestPageTables, vm_writer
from ..guest.program import run_program
from ..kvm.vm import VM
from .experiments import DOORBELL_GPA, RAM, RunResult, driver_page_tables, driver_program, driver_result

FLAVOURS = ("shadow", "ept", "npt", "nested-ept")
L2_BASE = 64 << 20
CR0 = X86_CR0_PG | X86_CR0_PE | X86_CR0_WP


def run_flavour(flavour: str, policy: str = "generation", iterations: int = 1000, seed: int = 1,
                tdp_mmu: bool = True) -> RunResult:
    nested = flavour == "nested-ept"
    vm = VM(mmu="ept" if nested else flavour, mmio_caching=policy, tdp_mmu=tdp_mmu)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=2 * L2_BASE if nested else RAM)
    vm.mmio_handler = lambda e: None if e.is_write else 0
    write, read = vm_writer(vm)
    offset = L2_BASE if nested else 0

    def w2(gpa: int, size: int, value: int) -> None:
        write(offset + gpa, size, value)

    def r2(gpa: int, size: int) -> int:
        return read(offset + gpa, size)
    pt = driver_page_tables(w2, r2)
    vcpu = vm.create_vcpu()
    if nested:
        ept = GuestPageTables("ept4", write, read, pool=0x200000)
        for off in range(0, RAM, 2 << 20):
            ept.map(off, L2_BASE + off, 2 << 20)
        ept.map(DOORBELL_GPA, 0xD0000000)
        ept.map(DOORBELL_GPA + 0x1000, 0xD0001000)
        vcpu.set_sregs(cr0=X86_CR0_PE)
        vcpu.enter_guest_mode(ept.eptp(), cr0=CR0, cr3=pt.cr3, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
    else:
        vcpu.set_sregs(cr0=CR0, cr3=pt.cr3, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
    result = run_program(vcpu, driver_program(vm, iterations, seed))
    if any(r.l1_exit is not None for r in result.faults):
        raise AssertionError("the nested workload exited to L1")
    return driver_result(flavour, policy, vm, vcpu, iterations)


def flavour_matrix(policy: str = "generation", iterations: int = 1000, seed: int = 1,
                   flavours: tuple[str, ...] = FLAVOURS, tdp_mmu: bool = True,
                   progress: Callable[[float], None] | None = None) -> list[RunResult]:
    out = []
    for i, f in enumerate(flavours):
        out.append(run_flavour(f, policy, iterations, seed, tdp_mmu))
        if progress is not None:
            progress((i + 1) / len(flavours))
    return out
