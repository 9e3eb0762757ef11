"""The devices the kernel drives: the local APIC (timer set-up, EOI, reschedule IPIs), ioremap and
virtio-blk requests with their completion interrupts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..pagetables import NX, PCD, PWT, RW, G, P
from .kmem import KernelMemory
from .layout import FIXMAP_APIC, PAGE
from .structs import Cpu, Process

if TYPE_CHECKING:
    from ...kvm.vcpu import Vcpu


class Drivers(KernelMemory):
    """GuestOS's device drivers (a mixin: state.KernelState)."""

    def apic_init(self, cpu: Cpu) -> None:
        if self.p.apic != "xapic":
            return
        v = cpu.vcpu
        self.mmio(v, FIXMAP_APIC + 0x30, 4, "read")
        self.mmio(v, FIXMAP_APIC + 0x320, 4, "write", 0x20000 | 0xEC if self.p.timer == "periodic" else 0xEC)
        if self.p.timer != "tsc-deadline":
            self.mmio(v, FIXMAP_APIC + 0x380, 4, "write", 100000)

    def ioremap(self, vcpu: Vcpu, name: str, phys: int, size: int, wc: bool = False) -> int:
        """ioremap(): a fresh range in the vmalloc area (plus a guard page), PTEs written through the vCPU."""
        va = self._vmalloc_next
        npages = (size + PAGE - 1) >> 12
        flags = P | RW | G | NX | (PWT if wc else PCD | PWT)
        for i in range(npages):
            self.set_kernel_pte(vcpu, va + (i << 12), (phys + (i << 12)) | flags)
        self._vmalloc_next = va + ((npages + 1) << 12)
        self.ioremaps[name] = va
        return va

    def send_ipi(self, src: Cpu, dst: Cpu) -> None:
        """A reschedule IPI: two ICR writes to the local APIC (xAPIC MMIO; an MSR with x2APIC)."""
        self.counters["ipis"] += 1
        if self.p.apic == "xapic":
            self.mmio(src.vcpu, FIXMAP_APIC + 0x310, 4, "write", dst.index << 24)
            self.mmio(src.vcpu, FIXMAP_APIC + 0x300, 4, "write", 0xFD)

    def eoi(self, cpu: Cpu) -> None:
        if self.p.apic == "xapic":
            self.mmio(cpu.vcpu, FIXMAP_APIC + 0xB0, 4, "write", 0)

    # -- block I/O ---------------------------------------------------------------------------------
    def disk_request(self, cpu: Cpu, now: int, waiter: Process | None, latency_us: float = 100.0) -> None:
        """virtio-blk: a descriptor in the ring, a doorbell write; the completion interrupt wakes `waiter`."""
        vcpu = cpu.vcpu
        self.counters["disk_requests"] += 1
        self.kwrite(vcpu, (self.ring_page << 12) + 8 * (self.counters["disk_requests"] % 256), now & 0xFFFFFFFF)
        self.mmio(vcpu, self.ioremaps["virtio-blk-notify"], 2, "write", 0)
        if waiter is not None:
            waiter.state = "blocked"
        self.at(cpu, now + self.p.cycles(latency_us * 1e-6), lambda c, t: self._blk_irq(c, t, waiter))

    def _blk_irq(self, cpu: Cpu, now: int, waiter: Process | None) -> int:
        vcpu = cpu.vcpu
        self.counters["irqs"] += 1
        if not self.machine.spec.msix:
            self.mmio(vcpu, self.ioremaps["virtio-blk-cfg"] + 0x800, 1, "read")
        self.kread(vcpu, (self.ring_page << 12) + 0x800)
        self.eoi(cpu)
        if waiter is not None and waiter.state == "blocked":
            self._enqueue(waiter, now, cpu)
        return self.p.cost_irq
