"""The guest kernel's configuration and native costs, its panic, its counters and the program type."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidArgument, KvmmuError

Op = tuple
Program = Generator[Op, Any, None]


class GuestPanic(KvmmuError):
    """The modelled guest OS cannot go on (e.g. out of memory for what the scenario asked)."""


OS_INT_MAX = 10**10                    # a native cost (cycles: 4 modelled s) or a size, at most


@dataclass(frozen=True)
class OsParams:
    """Guest kernel configuration and its native costs (host cycles of work a real kernel does)."""

    hz: int = 250                      # timer interrupts per second per busy vCPU
    apic: str = "xapic"                # xapic: EOI/ICR are MMIO writes; x2apic: MSRs (no MMIO)
    timer: str = "periodic"            # periodic | oneshot (a TMICT write per tick) | tsc-deadline (MSR)
    clocksource: str = "kvm-clock"     # kvm-clock | hpet (an HPET read per tick and per gettime)
    timeslice_ticks: int = 3
    ghz: float = 2.5                   # host cycles per nanosecond, to turn times into cycles
    boot_console_bytes: int = 64       # characters printed on the serial console at boot
    cost_fault: int = 1500             # native #PF handler work (find VMA, allocate, zero, set PTE)
    cost_syscall: int = 300
    cost_ctxsw: int = 2500
    cost_irq: int = 1200
    cost_fork: int = 40000
    cost_exec: int = 60000
    cost_exit: int = 25000
    cost_per_pte: int = 40             # per page-table entry copied / cleared (fork, exit, munmap)
    page_cache_mib: int = 0            # page cache cap (0: grows until memory is short, then reclaims)
    min_free_pages: int = 256          # reclaim the page cache below this many free frames

    def validate(self) -> None:
        if not isinstance(self.hz, int) or isinstance(self.hz, bool) or not 10 <= self.hz <= 10000:
            raise InvalidArgument("os.hz", self.hz, "the timer frequency is 10 to 10000 Hz")
        if self.apic not in ("xapic", "x2apic"):
            raise InvalidArgument("os.apic", self.apic, "the APIC mode is 'xapic' or 'x2apic'")
        if self.timer not in ("periodic", "oneshot", "tsc-deadline"):
            raise InvalidArgument("os.timer", self.timer, "the timer mode is 'periodic', 'oneshot' or 'tsc-deadline'")
        if self.clocksource not in ("kvm-clock", "hpet"):
            raise InvalidArgument("os.clocksource", self.clocksource, "the clocksource is 'kvm-clock' or 'hpet'")
        if not isinstance(self.ghz, (int, float)) or isinstance(self.ghz, bool) or not 0.1 <= self.ghz <= 10:
            raise InvalidArgument("os.ghz", self.ghz, "the clock is 0.1 to 10 GHz")
        if not isinstance(self.timeslice_ticks, int) or isinstance(self.timeslice_ticks, bool) \
                or not 1 <= self.timeslice_ticks <= 10000:
            raise InvalidArgument("os.timeslice_ticks", self.timeslice_ticks, "a timeslice is 1 to 10000 ticks")
        for name in ("boot_console_bytes", "cost_fault", "cost_syscall", "cost_ctxsw", "cost_irq", "cost_fork",
                     "cost_exec", "cost_exit", "cost_per_pte", "page_cache_mib", "min_free_pages"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= OS_INT_MAX:
                raise InvalidArgument(f"os.{name}", v, f"an integer from 0 to {OS_INT_MAX:,}")

    def cycles(self, seconds: float) -> int:
        return int(seconds * self.ghz * 1e9)


# The guest kernel's own counters (GuestOS.counters; a scenario report's "guest" section).
OS_COUNTERS = (
    "forks", "execs", "exits", "page_faults", "cow_faults", "segfaults", "context_switches", "ticks",
    "lost_ticks", "irqs", "ipis", "munmaps", "invlpgs", "tlb_flushes", "disk_requests", "net_requests",
    "page_cache_misses", "page_cache_reclaims", "mmio_accesses", "mmio_fast_path", "mmio_slow_path",
    "mmio_to_userspace", "kernel_pte_writes", "native_cycles")
