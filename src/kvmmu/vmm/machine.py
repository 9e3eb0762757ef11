"""Machines: a PC-like guest-physical layout built on one `kvmmu.VM`, with its devices and memslots.

The default layout (`MachineSpec()`; QEMU's `pc` machine with 3 GiB below 4 GiB):

    0x0000_0000 - 0x0009_ffff   slot 0  RAM (640 KiB)
    0x000a_0000 - 0x000b_ffff           VGA window (userspace MMIO)
    0x000c_0000 - 0x000f_ffff   slot 1  option ROMs / BIOS shadow (read-only memslot)
    0x0010_0000 - lowmem_end    slot 2  RAM below the PCI hole (lowmem_end = min(RAM, pci_hole_start))
    pci_hole_start - 4 GiB              the PCI hole: no RAM
      0xfd00_0000                slot 3  framebuffer (RAM with dirty logging, `framebuffer_mib`)
      0xfe00_0000 / 0xfe00_1000          virtio-net doorbell (ioeventfd: in-kernel) / config + ISR (userspace)
      0xfe00_2000 / 0xfe00_3000          virtio-blk doorbell / config + ISR
      0xfe01_0000 / 0xfe01_1000          pci-testdev BAR, userspace / with an ioeventfd (kvm-unit-tests)
      0xfe02_0000                        e1000 BAR (128 KiB, userspace) when `nic = "e1000"`
      0xfeb0_0000                        16550 serial port (userspace)
      0xfec0_0000                        IOAPIC (in-kernel with `kernel_irqchip`)
      0xfed0_0000                        HPET (userspace: QEMU emulates it)
      0xfee0_0000                        local APIC (in-kernel with `kernel_irqchip`)
      0xfffc_0000 - 0xffff_ffff  slot 4  BIOS flash (read-only memslot)
    0x1_0000_0000 - ...          slot 5  RAM above 4 GiB (RAM - lowmem_end), if any

Accesses to a device on KVM's MMIO bus complete in the kernel; the others exit to this VMM
(`handle_mmio`), which dispatches by address; an address with no device reads as all ones.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import InvalidArgument
from ..hw.host import Host
from ..kvm.emulate import MmioExit
from ..kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from ..kvm.vm import MMIO_POLICIES, MMU_FLAVOURS, VM
from .devices import (
    E1000,
    Device,
    Hpet,
    Ioapic,
    Lapic,
    PciTestDev,
    Uart16550,
    Unassigned,
    Vga,
    VirtioConfig,
    VirtioDoorbell,
)

_D = TypeVar("_D", bound=Device)
MiB = 1 << 20
GiB = 1 << 30
FOUR_GIB = 1 << 32
FRAMEBUFFER_GPA = 0xFD000000
DEVICE_AREA = 0xFE000000
BIOS_GPA = 0xFFFC0000
VIRTIO_NET_NOTIFY, VIRTIO_NET_CFG = 0xFE000000, 0xFE001000
VIRTIO_BLK_NOTIFY, VIRTIO_BLK_CFG = 0xFE002000, 0xFE003000
TESTDEV_USER, TESTDEV_KERNEL = 0xFE010000, 0xFE011000
E1000_GPA = 0xFE020000
SERIAL_GPA, IOAPIC_GPA, HPET_GPA, LAPIC_GPA = 0xFEB00000, 0xFEC00000, 0xFED00000, 0xFEE00000
KVM_PERMILLE_MMU_PAGES = 20
KVM_MIN_ALLOC_MMU_PAGES = 64
SLOT_RAM_LOW, SLOT_ROM, SLOT_RAM, SLOT_FB, SLOT_BIOS, SLOT_RAM_HIGH = 0, 1, 2, 3, 4, 5
FIRST_FREE_SLOT = 6


@dataclass(frozen=True)
class MachineSpec:
    """One VM's hardware.  Every field has a PC-like default; `validate()` names the broken rule."""

    name: str = "vm0"
    ram_mib: int = 512
    vcpus: int = 1
    mmu: str = "shadow"
    mmio_caching: str = "generation"
    pci_hole_start: int = 0xC0000000
    framebuffer_mib: int = 8
    kernel_irqchip: bool = True        # LAPIC + IOAPIC in KVM (QEMU's kernel_irqchip=on)
    ioeventfd: bool = True             # virtio doorbells complete in the kernel
    msix: bool = True                  # virtio interrupts by MSI-X: no ISR read per interrupt
    nic: str = "virtio"                # virtio | e1000
    mmu_pages: int | str = "kvm-default"   # KVM's shadow-page quota: "kvm-default", "unlimited" or a number
    initial_generation: int = 0
    tdp_mmu: bool = True               # kvm.tdp_mmu: EPT/NPT on the TDP MMU (False: the legacy MMU)

    def validate(self) -> None:
        def bad(what: str, value: object, rule: str) -> InvalidArgument:
            return InvalidArgument(f"machine {self.name}: {what}", value, rule)
        if not isinstance(self.ram_mib, int) or isinstance(self.ram_mib, bool) or not 16 <= self.ram_mib <= 1 << 20:
            raise bad("ram_mib", self.ram_mib, "guest RAM is an integer number of MiB between 16 and 1048576")
        if not isinstance(self.vcpus, int) or isinstance(self.vcpus, bool) or not 1 <= self.vcpus <= 64:
            raise bad("vcpus", self.vcpus, "a VM has 1 to 64 vCPUs")
        if self.mmu not in MMU_FLAVOURS:
            raise bad("mmu", self.mmu, f"the MMU flavour is one of {list(MMU_FLAVOURS)}")
        if self.mmio_caching not in MMIO_POLICIES:
            raise bad("mmio_caching", self.mmio_caching, f"the MMIO policy is one of {list(MMIO_POLICIES)}")
        h = self.pci_hole_start
        if not isinstance(h, int) or isinstance(h, bool) or h % (256 * MiB) or not 256 * MiB <= h <= 0xE0000000:
            raise bad("pci_hole_start", h, "the PCI hole starts on a 256 MiB boundary between 256 MiB and 3.5 GiB")
        fb = self.framebuffer_mib
        if not isinstance(fb, int) or isinstance(fb, bool) or not 0 <= fb <= 16:
            raise bad("framebuffer_mib", fb, "the framebuffer is 0 to 16 MiB (it must fit below the devices at "
                      "0xfe000000)")
        if fb and h > FRAMEBUFFER_GPA:
            raise bad("pci_hole_start", h, f"the framebuffer at {FRAMEBUFFER_GPA:#x} must lie inside the PCI hole")
        if self.nic not in ("virtio", "e1000"):
            raise bad("nic", self.nic, "the NIC is 'virtio' or 'e1000'")
        mp = self.mmu_pages
        if not (mp in ("kvm-default", "unlimited") or (isinstance(mp, int) and not isinstance(mp, bool)
                                                       and mp >= KVM_MIN_ALLOC_MMU_PAGES)):
            raise bad("mmu_pages", mp, f"'kvm-default', 'unlimited' or at least {KVM_MIN_ALLOC_MMU_PAGES}")
        for flag in ("kernel_irqchip", "ioeventfd", "msix", "tdp_mmu"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, getattr(self, flag), "must be true or false")

    @property
    def ram_bytes(self) -> int:
        return self.ram_mib * MiB

    @property
    def lowmem_end(self) -> int:
        return min(self.ram_bytes, self.pci_hole_start)

    @property
    def highmem_bytes(self) -> int:
        return self.ram_bytes - self.lowmem_end

    def max_mmu_pages(self) -> int | None:
        """kvm_mmu_calculate_default_mmu_pages: 20 shadow pages per 1000 guest pages, at least 64."""
        if self.mmu_pages == "unlimited":
            return None
        if self.mmu_pages == "kvm-default":
            return max(self.ram_bytes // 4096 * KVM_PERMILLE_MMU_PAGES // 1000, KVM_MIN_ALLOC_MMU_PAGES)
        return int(self.mmu_pages)


@dataclass
class Region:
    name: str
    start: int
    end: int
    kind: str          # ram | rom | ram+dirty-log | mmio (kernel) | mmio (userspace)
    slot: int | None = None


@dataclass
class Machine:
    """A VM with its PC-like layout, its devices and the VMM's KVM_EXIT_MMIO handler."""

    spec: MachineSpec
    host: Host
    vm: VM = field(init=False)
    devices: list[Device] = field(init=False, default_factory=list)
    regions: list[Region] = field(init=False, default_factory=list)
    # The slot numbers a guest workload that changes memslots needs (guest/platform.py).
    fb_slot = SLOT_FB
    first_free_slot = FIRST_FREE_SLOT

    def __post_init__(self) -> None:
        spec = self.spec
        spec.validate()
        self.vm = VM(mmu=spec.mmu, mmio_caching=spec.mmio_caching, host=self.host,
                     max_mmu_pages=spec.max_mmu_pages(), initial_generation=spec.initial_generation,
                     tdp_mmu=spec.tdp_mmu)
        self.vm.mmio_handler = self.handle_mmio
        self._user_bases: list[int] = []
        self._user_devs: list[Device] = []
        self._unassigned = Unassigned()
        self.kick_listeners: list = []       # called with (device, vcpu id) on a doorbell write
        self.display_refreshes = 0
        self._build()
        self.vcpus = [self.vm.create_vcpu() for _ in range(spec.vcpus)]

    # -- layout ------------------------------------------------------------------------------------
    def _slot(self, slot: int, name: str, start: int, size: int, flags: int = 0) -> None:
        self.vm.set_user_memory_region(slot=slot, guest_phys_addr=start, memory_size=size, flags=flags)
        kind = "rom" if flags & KVM_MEM_READONLY else ("ram+dirty-log" if flags & KVM_MEM_LOG_DIRTY_PAGES else "ram")
        self.regions.append(Region(name, start, start + size, kind, slot))

    def _build(self) -> None:
        s = self.spec
        self._slot(SLOT_RAM_LOW, "ram-low", 0, 0xA0000)
        self._slot(SLOT_ROM, "rom-shadow", 0xC0000, 0x40000, KVM_MEM_READONLY)
        self._slot(SLOT_RAM, "ram-below-4g", 0x100000, s.lowmem_end - 0x100000)
        if s.framebuffer_mib:
            self._slot(SLOT_FB, "framebuffer", FRAMEBUFFER_GPA, s.framebuffer_mib * MiB, KVM_MEM_LOG_DIRTY_PAGES)
        self._slot(SLOT_BIOS, "bios", BIOS_GPA, FOUR_GIB - BIOS_GPA, KVM_MEM_READONLY)
        if s.highmem_bytes:
            self._slot(SLOT_RAM_HIGH, "ram-above-4g", FOUR_GIB, s.highmem_bytes)
        irqchip = s.kernel_irqchip
        self.lapic = self.add_device(Lapic(LAPIC_GPA, in_kernel=irqchip))
        self.ioapic = self.add_device(Ioapic(IOAPIC_GPA, in_kernel=irqchip))
        self.hpet = self.add_device(Hpet(HPET_GPA))
        self.serial = self.add_device(Uart16550(SERIAL_GPA))
        self.vga = self.add_device(Vga())
        self.net_notify = self.add_device(VirtioDoorbell("virtio-net-notify", VIRTIO_NET_NOTIFY, s.ioeventfd))
        self.net_cfg = self.add_device(VirtioConfig("virtio-net-cfg", VIRTIO_NET_CFG))
        self.blk_notify = self.add_device(VirtioDoorbell("virtio-blk-notify", VIRTIO_BLK_NOTIFY, s.ioeventfd))
        self.blk_cfg = self.add_device(VirtioConfig("virtio-blk-cfg", VIRTIO_BLK_CFG))
        self.testdev_user = self.add_device(PciTestDev(TESTDEV_USER, in_kernel=False))
        self.testdev_kernel = self.add_device(PciTestDev(TESTDEV_KERNEL, in_kernel=True,
                                                                name="pci-testdev-ioeventfd"))
        self.e1000 = self.add_device(E1000(E1000_GPA)) if s.nic == "e1000" else None

    def add_device(self, dev: _D) -> _D:
        for d in self.devices:
            if dev.base < d.end and d.base < dev.end:
                raise InvalidArgument(f"machine {self.spec.name}: device {dev.name}", dev.base,
                                      f"overlaps device {d.name} at [{d.base:#x}, {d.end:#x})")
        for r in self.regions:
            if dev.base < r.end and r.start < dev.end:
                raise InvalidArgument(f"machine {self.spec.name}: device {dev.name}", dev.base,
                                      f"overlaps memslot {r.name} at [{r.start:#x}, {r.end:#x})")
        self.devices.append(dev)
        if dev.in_kernel and isinstance(dev, VirtioDoorbell):
            for addr in dev.notify_addrs():
                self.vm.ioeventfd(addr, 0, on_signal=dev.signal)
        elif dev.in_kernel:
            self.vm.register_io_device(dev.base, dev.size, dev)
        i = bisect_right(self._user_bases, dev.base)
        self._user_bases.insert(i, dev.base)
        self._user_devs.insert(i, dev)
        self.regions.append(Region(dev.name, dev.base, dev.end, f"mmio ({dev.where})"))
        return dev

    def layout(self) -> list[Region]:
        return sorted(self.regions, key=lambda r: r.start)

    def ram_ranges(self) -> list[tuple[int, int]]:
        """Guest RAM the guest OS may use, as [start, end) gpa ranges (the e820 map's usable RAM)."""
        out = [(0x100000, self.spec.lowmem_end)]
        if self.spec.highmem_bytes:
            out.append((FOUR_GIB, FOUR_GIB + self.spec.highmem_bytes))
        return out

    # -- the VMM's side of KVM_EXIT_MMIO ---------------------------------------------------------
    def device_at(self, gpa: int) -> Device | None:
        i = bisect_right(self._user_bases, gpa) - 1
        if i >= 0 and gpa < self._user_devs[i].end:
            return self._user_devs[i]
        return None

    def handle_mmio(self, exit_: MmioExit) -> int | None:
        dev = self.device_at(exit_.phys_addr) or self._unassigned
        if exit_.is_write:
            dev.write(exit_.phys_addr, exit_.len, exit_.value)
            if isinstance(dev, VirtioDoorbell):
                self._kicked(dev)
            return None
        v = dev.read(exit_.phys_addr, exit_.len)
        return (1 << (8 * exit_.len)) - 1 if v is None else v

    def _kicked(self, dev: Device) -> None:
        for fn in self.kick_listeners:
            fn(dev)

    def refresh_display(self) -> set[int]:
        """The VMM's display refresh: KVM_GET_DIRTY_LOG on the framebuffer (re-write-protects it)."""
        self.display_refreshes += 1
        if not self.spec.framebuffer_mib:
            return set()
        return self.vm.get_dirty_log(SLOT_FB)

    def write_phys(self, gpa: int, data: bytes) -> None:
        """The VMM writes guest RAM through its mmap (host pages are faulted in as it goes)."""
        for off in range(0, len(data), 4096):
            hva = self._hva(gpa + off)
            if hva is not None:
                self.vm.host_touch(hva, write=True)
        self.vm.write_phys(gpa, data)

    def _hva(self, gpa: int) -> int | None:
        slot = self.vm.memslots.spaces[0].search(gpa >> 12)
        return None if slot is None else slot.gfn_to_hva(gpa >> 12)

    def device_counts(self) -> dict[str, dict[str, int | str]]:
        return {d.name: {"where": d.where, "reads": d.reads, "writes": d.writes} for d in self.devices}


def default_host(spec_cores: int = 4, memory_mib: int | None = None, reserved_mib: int = 0) -> Host:
    return Host(memory_limit=None if memory_mib is None else memory_mib * MiB, reserved=reserved_mib * MiB,
                cores=spec_cores)
