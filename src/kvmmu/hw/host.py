"""The modelled host machine: its physical memory, MAXPHYADDR, and who owns which frames.

Host virtual and physical addresses coincide (one flat host), so a VMM's guest-RAM mapping at hva
H is host frame H >> 12.  Each VMM process gets its own region; KVM's shadow tables come from a
kernel region.  Nothing is allocated until written (SparseMemory).
"""

from __future__ import annotations

from ..errors import InvalidArgument
from .memory import SparseMemory

_VMM_BASE = 1 << 32          # first VMM process region
_DMA32_BASE = 0x80000000     # ... except pages that a 32-bit CR3 must reach (PAE roots)


class Host:
    """A host with `maxphyaddr` physical address bits (46 by default, as on the machines here)."""

    def __init__(self, maxphyaddr: int = 46, memory_limit: int | None = None) -> None:
        if not 36 <= maxphyaddr <= 52:
            raise InvalidArgument("host maxphyaddr", maxphyaddr, "the host's MAXPHYADDR is between 36 and 52")
        self.maxphyaddr = maxphyaddr
        # KVM's own page tables live in the top half of host memory; VMM processes share the rest.
        self.kernel_base = 1 << (maxphyaddr - 1)
        self.vmm_region = min(1 << 40, (self.kernel_base - _VMM_BASE) // 8) & ~0xFFFFF
        self.mem = SparseMemory(1 << maxphyaddr, name="host physical memory")
        self.memory_limit = memory_limit
        self._next_vmm = 0
        self._next_kernel_pfn = self.kernel_base >> 12
        self._free_kernel_pfns: list[int] = []
        self._next_dma32_pfn = _DMA32_BASE >> 12
        self._free_dma32_pfns: list[int] = []
        self.kernel_pages_in_use = 0
        self.vms: list[object] = []

    def new_vmm_region(self) -> tuple[int, int]:
        """[start, end) of a fresh VMM process address space for one VM's guest RAM."""
        start = _VMM_BASE + self._next_vmm * self.vmm_region
        self._next_vmm += 1
        if start + self.vmm_region > self.kernel_base:
            raise InvalidArgument("VMs on this host", self._next_vmm,
                                  f"a host with MAXPHYADDR {self.maxphyaddr} has room for "
                                  f"{(self.kernel_base - _VMM_BASE) // self.vmm_region} VMM address spaces")
        return start, start + self.vmm_region

    def alloc_kernel_page(self, dma32: bool = False) -> int:
        """A zeroed 4 KiB kernel page; returns its host physical address.

        dma32 pages lie below 4 GiB: KVM's PAE root must, because the CPU loads a 32-bit CR3.
        """
        if dma32:
            if self._free_dma32_pfns:
                pfn = self._free_dma32_pfns.pop()
            else:
                pfn = self._next_dma32_pfn
                self._next_dma32_pfn += 1
        else:
            pfn = self._free_kernel_pfns.pop() if self._free_kernel_pfns else self._take_pfn()
        self.kernel_pages_in_use += 1
        return pfn << 12

    def _take_pfn(self) -> int:
        pfn = self._next_kernel_pfn
        self._next_kernel_pfn += 1
        return pfn

    def free_kernel_page(self, hpa: int) -> None:
        self.mem.drop_page(hpa >> 12)
        (self._free_dma32_pfns if hpa < _VMM_BASE else self._free_kernel_pfns).append(hpa >> 12)
        self.kernel_pages_in_use -= 1

    def is_kernel_address(self, hpa: int) -> bool:
        return hpa >= self.kernel_base or _DMA32_BASE <= hpa < _VMM_BASE
