"""The guest's periodic tick across NO_HZ idle.

Linux stops the tick when a CPU goes idle (tick_nohz_idle_stop_tick) and, on idle exit, restarts the
sched_timer on its own grid: tick_nohz_restart() sets the expiry back to ts->last_tick and
hrtimer_forward()s it by whole TICK_NSEC periods past now.  So the tick fires at every point of the
grid t0 + k * period at which the CPU is running, however often it idles in between; it is never
re-armed a full period after each wake-up (a vCPU idling more often than once a period would then
never tick).
"""

from pathlib import Path

import kvmmu
from kvmmu.guest.os import GuestOS, OsParams
from kvmmu.scenario import Scenario
from kvmmu.vmm import Machine, MachineSpec
from kvmmu.vmm.runner import HostRunner

MS = 2_500_000                     # cycles per millisecond at the default 2.5 GHz


def _busy_idle_guest(busy_ms: float, idle_ms: float, seconds: float) -> tuple[GuestOS, list[tuple[int, int]]]:
    host = kvmmu.Host()
    m = Machine(MachineSpec(ram_mib=64, vcpus=1), host)
    os_ = GuestOS(m, OsParams(boot_console_bytes=0, hz=250), seed=1)
    os_.boot()

    def loop():
        while True:
            yield ("compute", int(busy_ms * MS))
            yield ("sleep", int(idle_ms * MS))
    os_.spawn("loop", loop(), pin=0, kernel_thread=True)
    running: list[tuple[int, int]] = []
    run_slice = os_.run_slice

    def recorded(cpu, start, budget):
        used, wake = run_slice(cpu, start, budget)
        running.append((start, start + used))
        return used, wake
    os_.run_slice = recorded
    HostRunner(host, [os_]).run(int(seconds * 2.5e9))
    return os_, running


def test_tick_fires_on_its_grid_while_the_vcpu_idles_more_often_than_once_a_period():
    # 1.5 ms busy, 0.7 ms idle: an idle exit every ~2.2 ms, the tick period is 4 ms (HZ=250).
    os_, running = _busy_idle_guest(1.5, 0.7, 0.2)
    period = os_.tick_period
    assert period == 4 * MS
    t0, end = running[0][0], running[-1][1]
    on_grid = sum(any(a <= g < b for a, b in running) for g in range(t0 + period, end, period))
    assert on_grid > 20                       # the busy share (~70 %) of the run's 50 grid points
    assert os_.counters["ticks"] == on_grid
    assert os_.counters["lost_ticks"] == 0


def test_scenario_guests_that_idle_often_still_tick():
    """The symptom of the bug: scenarios/tiny.toml reported `ticks 0`."""
    res = Scenario.load(Path(__file__).parents[3] / "scenarios" / "tiny.toml").run()
    assert res.total("ticks") > 0
    net = Scenario.load(Path(__file__).parents[3] / "scenarios" / "netperf-rr.toml").scaled(duration_s=0.05).run()
    assert net.total("ticks") > 0
