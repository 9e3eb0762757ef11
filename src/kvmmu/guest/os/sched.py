"""The scheduler and the time model: wake-ups and IPIs, per-CPU timed events, context switches,
timer ticks (NO_HZ idle), and running one vCPU for a slice of host time."""

from __future__ import annotations

from collections.abc import Callable

from .kmem import KernelMemory
from .layout import FIXMAP_APIC, FIXMAP_HPET
from .params import GuestPanic
from .structs import MM, Cpu, Process


class Scheduler(KernelMemory):
    """GuestOS's scheduler and clock (a mixin: state.KernelState)."""

    # -- wake-ups and timed events -----------------------------------------------------------------
    def _enqueue(self, proc: Process, now: int | None, src: Cpu | None = None) -> None:
        """Make proc runnable (try_to_wake_up); an idle CPU that should run it gets a reschedule IPI."""
        proc.state = "runnable"
        if proc.pin is not None:
            cpu = self.cpus[proc.pin]
            cpu.runqueue.append(proc)
            if now is not None and cpu.idle:
                self._kick_cpu(cpu, now, src)
            return
        self.global_rq.append(proc)
        if now is not None:
            for cpu in self.cpus:
                if cpu.idle and not cpu.runqueue:
                    self._kick_cpu(cpu, now, src)
                    break

    def _kick_cpu(self, cpu: Cpu, now: int, src: Cpu | None) -> None:
        if src is not None and src is not cpu:
            self.send_ipi(src, cpu)
        cpu.idle = False
        self.wake_requests.append((cpu.index, now))

    def at(self, cpu: Cpu, when: int, fn: Callable[[Cpu, int], int]) -> None:
        """Schedule `fn` (an interrupt) on `cpu` at time `when`; it returns the native cycles it used."""
        cpu.events.push(when, fn)
        if cpu.idle:
            cpu.idle = False
            self.wake_requests.append((cpu.index, when))

    def vmm_at(self, when: int, fn: Callable[[int], None]) -> None:
        """Schedule work of the VMM's own threads (display refresh, hotplug) at host time `when`."""
        self.vmm_timers.push(when, fn)

    # -- scheduling --------------------------------------------------------------------------------
    def _switch_mm(self, cpu: Cpu, mm: MM | None) -> None:
        target = mm.pgd if mm is not None else self.kpgd
        if cpu.cr3 == target:
            return
        old = cpu.cr3
        cpu.vcpu.write_cr3(target << 12)
        cpu.cr3 = target
        self._mm_unloaded(cpu, old)
        if mm is not None:
            mm.loaded_on.add(cpu.index)

    def _mm_unloaded(self, cpu: Cpu, old_pgd: int) -> None:
        mm = self.mms.get(old_pgd)
        if mm is not None:
            mm.loaded_on.discard(cpu.index)
            if mm.dead and not mm.loaded_on:
                self._free_pgd(mm)

    def schedule(self, cpu: Cpu, now: int) -> Process | None:
        prev = cpu.current
        if prev is not None and prev.state == "running":
            prev.state = "runnable"
            (cpu.runqueue if prev.pin is not None else self.global_rq).append(prev)
        nxt = None
        for q in (cpu.runqueue, self.global_rq):
            while q:
                cand = q.popleft()
                if cand.state == "runnable" and cand.pid in self.procs:
                    nxt = cand
                    break
            if nxt is not None:
                break
        cpu.need_resched = False
        cpu.slice_ticks = self.p.timeslice_ticks
        if nxt is None:
            cpu.current = None
            return None
        if nxt is not prev:
            self.counters["context_switches"] += 1
            self._charge(cpu, self.p.cost_ctxsw)
            self.kwrite(cpu.vcpu, (nxt.kstack << 12) + 0xF00, nxt.pid)       # switch_to: the new kernel stack
            if nxt.mm is not None:
                self._switch_mm(cpu, nxt.mm)
        nxt.state = "running"
        cpu.current = nxt
        return nxt

    # -- running a vCPU ----------------------------------------------------------------------------
    def _charge(self, cpu: Cpu, cycles: int) -> None:
        cpu.clock += cycles
        self.counters["native_cycles"] += cycles

    def _account(self, cpu: Cpu) -> None:
        """Advance the CPU's clock by what the cost model charges for what KVM did since last time."""
        v = cpu.vcpu
        exits = v.stats["exits"]
        walks = v.counters["hw_walks"]
        if exits == cpu.last_exits and walks == cpu.last_walks:
            return
        cpu.last_exits, cpu.last_walks = exits, walks
        c = self._vcpu_cost(v)
        cpu.clock += c - cpu.last_cost
        cpu.last_cost = c
        vc = self._vm_cost(self.vm)
        cpu.clock += vc - self.vm_last_cost
        self.vm_last_cost = vc

    def timer_tick(self, cpu: Cpu) -> None:
        self.counters["ticks"] += 1
        self.counters["irqs"] += 1
        self._charge(cpu, self.p.cost_irq)
        if self.p.clocksource == "hpet":
            self.mmio(cpu.vcpu, FIXMAP_HPET + 0xF0, 8, "read")
        if self.p.timer == "oneshot" and self.p.apic == "xapic":
            self.mmio(cpu.vcpu, FIXMAP_APIC + 0x380, 4, "write", 100000)
        self.eoi(cpu)
        cpu.slice_ticks -= 1
        if cpu.slice_ticks <= 0 and (cpu.runqueue or self.global_rq):
            cpu.need_resched = True

    def run_slice(self, cpu: Cpu, start: int, budget: int) -> tuple[int, int | None]:
        """Run this vCPU from host time `start` for at most `budget` cycles.

        Returns (cycles used, when it wants to run next: a time, or None when it sleeps until woken).
        """
        cpu.clock = start
        end = start + budget
        if not cpu.ticking:
            cpu.ticking = True
            if cpu.next_tick == 0:
                cpu.next_tick = start + self.tick_period
            elif cpu.next_tick <= start:
                # NO_HZ idle exit (tick_nohz_restart): the tick timer is forwarded on its own grid
                # (last_tick + k * TICK_NSEC) to the first expiry after now, not re-armed a whole
                # period from now, so a vCPU that idles more often than once a period still ticks.
                cpu.next_tick += ((start - cpu.next_tick) // self.tick_period + 1) * self.tick_period
        self.vm.trace.current_vcpu = cpu.vcpu.id
        while cpu.clock < end:
            now = cpu.clock
            # Interrupts first: due device completions, then the timer (missed ticks are coalesced).
            while cpu.events and cpu.events.next_time <= now:
                _, fn = cpu.events.pop()
                self._charge(cpu, fn(cpu, cpu.clock))
                self._account(cpu)
            if cpu.ticking and cpu.clock >= cpu.next_tick:
                missed = (cpu.clock - cpu.next_tick) // self.tick_period
                self.counters["lost_ticks"] += missed
                cpu.next_tick += (missed + 1) * self.tick_period
                self.timer_tick(cpu)
                self._account(cpu)
            proc = cpu.current
            if proc is None or proc.state != "running" or cpu.need_resched:
                proc = self.schedule(cpu, cpu.clock)
                self._account(cpu)
                if proc is None:
                    cpu.idle = True
                    cpu.ticking = False          # NO_HZ idle: no ticks while idle (next_tick keeps the grid)
                    wake = cpu.events.next_time if cpu.events else None
                    return max(1, cpu.clock - start), wake
            self._step(cpu, proc, end)
            self._account(cpu)
        return cpu.clock - start, cpu.clock

    def _step(self, cpu: Cpu, proc: Process, end: int) -> None:
        """Execute (part of) the process's current operation."""
        if proc.pending is None:
            try:
                op = proc.program.send(proc.reply) if proc.started else next(proc.program)
            except StopIteration:
                op = ("exit",)
            proc.started = True
            proc.reply = None
            proc.pending = op
            proc.stats["ops"] += 1
            if op[0] == "compute":
                proc.compute_left = int(op[1])
        op = proc.pending
        kind = op[0]
        handler = self._ops.get(kind)
        if handler is None:
            raise GuestPanic(f"process {proc.name}[{proc.pid}]: unknown operation {op!r}")
        done, reply = handler(self, cpu, proc, op, end)
        if done:
            proc.pending = None
            proc.reply = reply
