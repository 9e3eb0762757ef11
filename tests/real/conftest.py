"""Shared fixture for the real-KVM tests: a VM with 2 MiB of RAM at GPA 0 in flat long mode."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmmu.real import FlatLongMode, RealVcpu, RealVM


class GuestFactory:
    """Builds VMs whose guest code starts at CODE with RSP = STACK_TOP; closes them afterwards.

    Guest-physical layout (slot 0, [0, 2 MiB)): GDT 0x1000, IDT 0x2000, TSS 0x3000, CPL0 stack
    below 0x9000, CPL3->CPL0 exception stack below 0xa000, page tables from 0x10000 (identity map
    of 4 GiB with 2 MiB user pages), DATA 0x20000, CODE 0x40000, HANDLER 0x50000.  MMIO is an
    address inside the identity map but outside every memslot.
    """

    RAM_SIZE = 2 << 20
    DATA = 0x20000
    CODE = 0x40000
    HANDLER = 0x50000
    STACK_TOP = 0x9000
    MMIO = 0xD000_0000

    def __init__(self) -> None:
        self.vms: list[RealVM] = []

    def __call__(self, code: bytes, cpl: int = 0, handler: bytes | None = None,
                 slots: tuple[tuple[int, ...], ...] = ()) -> tuple[RealVM, RealVcpu]:
        vm = RealVM()
        self.vms.append(vm)
        vm.set_user_memory_region(0, 0, self.RAM_SIZE)
        for slot in slots:
            vm.set_user_memory_region(*slot)
        vcpu = vm.create_vcpu()
        FlatLongMode().install(vm, vcpu, cpl=cpl,
                               handlers=self.HANDLER if handler is not None else None)
        if handler is not None:
            vm.write_phys(self.HANDLER, handler)
        vm.write_phys(self.CODE, code)
        vcpu.set_regs(rip=self.CODE, rsp=self.STACK_TOP, rflags=0x2)
        return vm, vcpu

    def close(self) -> None:
        for vm in self.vms:
            vm.close()


@pytest.fixture
def guest() -> Iterator[GuestFactory]:
    factory = GuestFactory()
    yield factory
    factory.close()
