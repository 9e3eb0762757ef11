"""Resource limits on a long run (issue 8, "memory that stays bounded"): a guest that keeps remapping
its pages, switching between address spaces and touching MMIO, while the VMM keeps moving a memslot,
must not make the model grow.  The shadow-page quota recycles pages (mmu_recycled), the trace and
MMIO-exit buffers keep their capacity, host memory holds only what the guest can still reach, and
the Python heap stops growing once the working set is warm."""

from __future__ import annotations

import random
import tracemalloc

import pytest

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.guest.pagetables import RW, GuestPageTables, P, vcpu_writer, vm_writer

POOL, POOL_END = 0x100000, 0x180000
SPACES = 8
QUOTA = 64
MMIO = 0xD000_0000
MOVING = (0x200_0000, 0x300_0000, 0x400_0000)     # where the VMM keeps moving slot 1


def _setup(mmu: str) -> tuple[kvmmu.VM, kvmmu.Vcpu, list[GuestPageTables]]:
    vm = kvmmu.VM(mmu=mmu, max_mmu_pages=QUOTA, mmio_log_size=50)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    vm.set_user_memory_region(slot=1, guest_phys_addr=MOVING[0], memory_size=1 << 20)
    vm.mmio_handler = lambda exit_: 0x5A
    vm.trace.enable(capacity=500)
    vcpu = vm.create_vcpu()
    spaces = []
    for k in range(SPACES):
        # Every address space maps the table pool (gva == gpa) so the guest can edit any of them.
        pt = GuestPageTables("4level", *vm_writer(vm), pool=POOL + k * 0x10000, pool_end=POOL + (k + 1) * 0x10000)
        pt.map_range(POOL, POOL, POOL_END - POOL, P | RW)
        pt.map(0x4000_0000, MMIO, flags=P | RW)
        spaces.append(pt)
    vcpu.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr3=spaces[0].cr3, cr4=X86_CR4_PAE,
                   efer=EFER_LME | EFER_NX)
    for pt in spaces:
        pt.write, pt.read = vcpu_writer(vcpu)       # from now on the guest edits its own tables
    return vm, vcpu, spaces


def _churn(vm: kvmmu.VM, vcpu: kvmmu.Vcpu, spaces: list[GuestPageTables], rng: random.Random, n: int,
           start: int) -> None:
    for i in range(start, start + n):
        pt = spaces[rng.randrange(SPACES)]
        vcpu.write_cr3(pt.cr3)
        gva = 0x8000_0000 + rng.randrange(64) * 0x1000
        # 96 frames in slot 0 and 16 in the moving slot: the warm-up touches them all, so any later
        # growth is the model's, not guest RAM being touched for the first time.
        frame = 0x20_0000 + rng.randrange(96) * 0x1000 if rng.random() < 0.8 \
            else MOVING[(i // 200) % 3] + rng.randrange(16) * 0x1000
        pt.map(gva, frame, flags=P | RW)
        vcpu.invlpg(gva)
        r = vcpu.access(gva + 8, 8, "write", i)
        assert r.fault is None, r
        assert vcpu.access(gva + 8, 8, "read").value == i
        assert vcpu.access(0x4000_0000, 4, "read").value == 0x5A
        if i % 200 == 199:
            vm.set_user_memory_region(slot=1, guest_phys_addr=MOVING[(i // 200 + 1) % 3], memory_size=1 << 20)


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_a_long_churning_run_stays_bounded(mmu: str) -> None:
    vm, vcpu, spaces = _setup(mmu)
    rng = random.Random(7)
    _churn(vm, vcpu, spaces, rng, 800, 0)                           # warm up: every structure at its size
    tracemalloc.start()
    try:
        warm = tracemalloc.get_traced_memory()[0]
        _churn(vm, vcpu, spaces, rng, 1000, 800)
        grown = tracemalloc.get_traced_memory()[0] - warm
    finally:
        tracemalloc.stop()
    mmu_ = vm.mmu
    assert mmu_.n_used_mmu_pages <= QUOTA
    assert len(mmu_.active_mmu_pages) <= QUOTA
    if mmu == "shadow":
        assert vm.stats["mmu_recycled"] > 0, "8 address spaces cannot fit in 64 shadow pages without recycling"
    assert len(vm.trace.events) <= 500 and len(vm.mmio_log) <= 50
    # Host pages: the guest's tables and data frames, the MMU's table pages (bounded by the quota) and
    # KVM's PAE/special roots -- never one page per remap.
    assert vm.host.mem.resident_pages() <= (POOL_END - POOL) // 4096 + 96 + 16 + QUOTA + 64
    assert grown < 1 << 20, f"the heap grew by {grown} bytes over 1,000 churning iterations"
