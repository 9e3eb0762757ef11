"""The host running its VMs: every vCPU is a thread, the host's cores run them, time is host cycles.

A deterministic list scheduler: the runnable vCPU that has waited longest gets the core that frees up
first, for at most one host timeslice; ties are broken by an order drawn from the seed.  A vCPU that
halts (its guest is idle) leaves the core until its next interrupt, or until another vCPU wakes it
(an IPI).  While a vCPU waits for a core its guest's time still passes, so timer ticks it missed are
coalesced into one, as KVM's hrtimer-driven LAPIC timer does.  The VMM's own threads (display refresh,
memslot changes) run at their scheduled times between slices.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..sim.clock import Clock, EventQueue

if TYPE_CHECKING:
    from ..guest.os import GuestOS
    from ..hw.host import Host


@dataclass
class RunStats:
    host_cycles: int = 0           # modelled host time at the end
    slices: int = 0
    busy_cycles: int = 0           # core time spent running vCPUs
    stopped_by: str = "duration"


class HostRunner:
    def __init__(self, host: Host, oses: list[GuestOS], seed: int = 1, slice_us: float = 1000.0,
                 progress: Callable[[float], None] | None = None, clock: Clock | None = None) -> None:
        self.host = host
        self.oses = oses
        self.seed = seed
        self.ghz = oses[0].p.ghz if oses else 2.5
        self.slice = max(1, int(slice_us * 1e3 * self.ghz))
        self.progress = progress
        self.stats = RunStats()
        # The guests' clock when there is one: their events and the ready vCPUs share one order.
        self.clock = clock if clock is not None else oses[0].clock if oses else Clock()

    def run(self, duration_cycles: int, until_done: bool = True) -> RunStats:
        """Run until `duration_cycles` of host time, or until every workload says it is done."""
        rng = random.Random(f"kvmmu-host:{self.seed}")
        cpus = [(os_, cpu) for os_ in self.oses for cpu in os_.cpus]
        order = list(range(len(cpus)))
        rng.shuffle(order)
        ready: EventQueue[tuple[int, int]] = self.clock.queue()     # (cpu id, version) when it may run
        version = [0] * len(cpus)
        index = {(id(os_), cpu.index): i for i, (os_, cpu) in enumerate(cpus)}
        for i in order:
            ready.push(0, (i, 0))
        sleeping: dict[int, int] = {}                      # cpu id -> time it went idle
        queued_at: dict[int, int] = dict.fromkeys(range(len(cpus)), 0)    # cpu id -> its time in `ready`
        cores = [(0, c) for c in range(self.host.cores)]
        heapq.heapify(cores)
        timers = self.oses
        last_report = 0
        while ready:
            t, (i, ver) = ready.pop()
            if ver != version[i]:
                continue
            queued_at.pop(i, None)
            core_free, core = heapq.heappop(cores)
            start = max(t, core_free)
            if start >= duration_cycles:
                heapq.heappush(cores, (core_free, core))
                self.stats.stopped_by = "duration"
                break
            for os_ in timers:
                while os_.vmm_timers and os_.vmm_timers.next_time <= start:
                    when, fn = os_.vmm_timers.pop()
                    fn(when)
            os_, cpu = cpus[i]
            budget = min(self.slice, duration_cycles - start)
            for o in timers:
                if o.vmm_timers:          # stop at the VMM's next action so it happens on time
                    budget = min(budget, max(1, o.vmm_timers.next_time - start))
            used, wake = os_.run_slice(cpu, start, budget)
            self.stats.slices += 1
            self.stats.busy_cycles += used
            end = start + used
            heapq.heappush(cores, (end, core))
            version[i] += 1
            if wake is None:
                sleeping[i] = end
            else:
                queued_at[i] = max(wake, end)
                ready.push(queued_at[i], (i, version[i]))
            for o in self.oses:
                if o.wake_requests:
                    for cpu_index, when in o.wake_requests:
                        j = index[(id(o), cpu_index)]
                        at = max(when, sleeping.get(j, end if j == i else 0))
                        if j in queued_at and queued_at[j] <= at:
                            continue
                        sleeping.pop(j, None)
                        version[j] += 1
                        queued_at[j] = at
                        ready.push(at, (j, version[j]))
                    o.wake_requests.clear()
            if self.stats.slices % 1024 == 0:
                for o in self.oses:
                    o.vm.mmio_log.clear()
            if until_done and all(o.done for o in self.oses):
                self.stats.stopped_by = "workload done"
                self.stats.host_cycles = end
                break
            if self.progress is not None and end - last_report > duration_cycles // 200:
                last_report = end
                self.progress(min(1.0, end / duration_cycles))
        else:
            self.stats.stopped_by = "every vCPU idle"
        self.stats.host_cycles = max(self.stats.host_cycles, min(duration_cycles, max(c for c, _ in cores)))
        for o in self.oses:
            o.vm.mmio_log.clear()
        return self.stats
