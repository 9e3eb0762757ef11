"""The kernel's own memory accesses, always through a vCPU: the direct map, device registers, page
clearing and copying, and the page-table writes of every address space."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..pagetables import RW, US, G, P
from .layout import DIRECT_MAP, PAGE
from .params import GuestPanic
from .state import KernelState
from .structs import MM

if TYPE_CHECKING:
    from ...kvm.vcpu import Vcpu


class KernelMemory(KernelState):
    """GuestOS's memory primitives, which the other parts build on (a mixin: state.KernelState)."""

    # -- low-level kernel memory access (always through a vCPU) ------------------------------------
    def kwrite(self, vcpu: Vcpu, gpa: int, value: int, size: int = 8) -> None:
        r = vcpu.access(DIRECT_MAP + gpa, size, "write", value, cpl=0)
        if r.fault is not None:
            raise GuestPanic(f"kernel store to the direct map at gpa {gpa:#x} faulted: {r.fault}")

    def kread(self, vcpu: Vcpu, gpa: int, size: int = 8) -> int:
        r = vcpu.access(DIRECT_MAP + gpa, size, "read", cpl=0)
        value = r.value
        if value is None or r.fault is not None:
            raise GuestPanic(f"kernel load from the direct map at gpa {gpa:#x} "
                             f"{'returned no value' if r.fault is None else f'faulted: {r.fault}'}")
        return value

    def mmio(self, vcpu: Vcpu, gva: int, size: int, kind: str, value: int | None = None) -> int | None:
        """A driver's access to an ioremap'd / fixmap'd device register."""
        c = self.counters
        c["mmio_accesses"] += 1
        st = vcpu.stats
        taken, exits = st["pf_taken"], st["exits"]
        r = vcpu.access(gva, size, kind, value, cpl=0)
        if st["pf_taken"] != taken:
            c["mmio_slow_path"] += 1          # the full fault path ran: the access missed the fast path
        elif st["exits"] != exits:
            c["mmio_fast_path"] += 1          # recognised as MMIO by the fast path (spte or MMIO cache)
        if r.mmio_exit_records:
            c["mmio_to_userspace"] += 1
        if r.fault is not None:
            raise GuestPanic(f"device register access at {gva:#x} faulted: {r.fault}")
        return r.value

    def clear_page(self, vcpu: Vcpu, gfn: int) -> None:
        """clear_page (`rep stosq`): stores through the vCPU until one completes without an exit (the
        page is then writable in KVM's tables and the TLB, so the rest would run natively too);
        the remaining bytes are then written the way the CPU would, without KVM seeing them."""
        base = gfn << 12
        st = vcpu.stats
        for off in range(0, PAGE, 8):
            before = st["exits"]
            self.kwrite(vcpu, base + off, 0)
            if st["exits"] == before:
                break
        else:
            return
        self.vm.write_phys(base, bytes(PAGE))

    def copy_page(self, vcpu: Vcpu, src: int, dst: int) -> None:
        """copy_page: a load from the source, stores to the destination as clear_page does, then the data."""
        self.kread(vcpu, src << 12)
        self.clear_page(vcpu, dst)
        self.vm.write_phys(dst << 12, self.vm.read_phys(src << 12, PAGE))

    # -- page tables -------------------------------------------------------------------------------
    @staticmethod
    def _index(va: int, level: int) -> int:
        return (va >> (12 + 9 * (level - 1))) & 511

    def _table(self, vcpu: Vcpu | None, tables: dict, root: int, va: int, level: int, upper: int,
               alloc: Callable[[], int]) -> int:
        """gfn of the table at `level` covering va, creating the tables above it (through the vCPU, or the
        VMM before boot when vcpu is None)."""
        table = root
        for lvl in range(4, level, -1):
            key = (lvl - 1, va >> (12 + 9 * (lvl - 1)))
            child = tables.get(key)
            if child is None:
                child = alloc()
                if vcpu is None:
                    self.vm.write_phys(child << 12, bytes(PAGE))
                    self.vm.write_phys((table << 12) + 8 * self._index(va, lvl),
                                       ((child << 12) | upper).to_bytes(8, "little"))
                else:
                    self.clear_page(vcpu, child)
                    self.kwrite(vcpu, (table << 12) + 8 * self._index(va, lvl), (child << 12) | upper)
                    self.counters["kernel_pte_writes"] += 1
                tables[key] = child
            table = child
        return table

    def set_user_pte(self, vcpu: Vcpu, mm: MM, va: int, value: int) -> None:
        pt = self._table(vcpu, mm.tables, mm.pgd, va, 1, P | RW | US, self.frames.alloc)
        self.kwrite(vcpu, (pt << 12) + 8 * self._index(va, 1), value)
        self.counters["kernel_pte_writes"] += 1

    def read_user_pte(self, vcpu: Vcpu, mm: MM, va: int) -> int:
        pt = mm.tables.get((1, va >> 21))
        return 0 if pt is None else self.kread(vcpu, (pt << 12) + 8 * self._index(va, 1))

    def set_kernel_pte(self, vcpu: Vcpu | None, va: int, value: int, level: int = 1) -> None:
        t = self._table(vcpu, self.ktables, self.kpgd, va, level, P | RW | G, self.frames.alloc)
        addr = (t << 12) + 8 * self._index(va, level)
        if vcpu is None:
            self.vm.write_phys(addr, value.to_bytes(8, "little"))
        else:
            self.kwrite(vcpu, addr, value)
            self.counters["kernel_pte_writes"] += 1
