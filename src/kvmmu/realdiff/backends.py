"""The two backends behind one contract, and the one observation loop that drives either.

`GuestVM` is the part of KVM's VM API the loop uses; `kvmmu.VM` and `kvmmu.real.RealVM` both have it
as they are.  A `Backend` adds what differs: how the vCPU is created and entered (the model runs the
guest's instructions on `hw.x86cpu.X86Cpu` over a host profile's bus; the real backend calls
KVM_RUN), where its MMIO log and registers are read, and what it records beyond the common
observables.  Both use the program's `Device` as their KVM_EXIT_MMIO handler with one signature.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..guest.runtime import RT_LOG, GuestImage, Program, Slot, WritePhys, build
from ..real.stats import StatValue, stats_delta
from . import undefined_mask
from .observation import (
    _VM_EXTRA,
    _X86_ORDER,
    COUNTERS,
    EXTRA_COUNTERS,
    REG_NAMES,
    VM_COUNTERS,
    Device,
    Mmio,
    MmioRecord,
    Observation,
    _capture_memory,
    _decode_log,
    _guest_pages,
    _prefault,
)

if TYPE_CHECKING:
    from ..kvm.profiles import HostProfile


@runtime_checkable
class GuestVM(Protocol):
    """What the observation loop asks of a VM: memslots, guest-physical memory, VM statistics."""

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int, flags: int = 0) -> Any: ...

    def write_phys(self, gpa: int, data: bytes) -> None: ...

    def read_phys(self, gpa: int, length: int) -> bytes: ...

    @property
    def stats(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Stop:
    """How one run ended: KVM's exit reason name (``hlt``, ``shutdown``, ``internal_error``...),
    ``timeout``, or the model's ``step_limit`` / ``unsupported`` with ``error`` (the run cannot go
    on); ``note`` is kept in ``Observation.notes``."""

    reason: str
    error: str | None = None
    note: str | None = None


@runtime_checkable
class Backend(Protocol):
    """One side of the differential run."""

    name: str                  # Observation.backend
    binary_stats: bool         # whether every moving statistic is kept in Observation.stats

    @property
    def vm(self) -> GuestVM:
        """The backend's own VM type (read-only here, so `kvmmu.VM` and `RealVM` both qualify)."""
        ...

    def start(self, image: GuestImage, device: Device) -> None:
        """Create the vCPU, load the image's entry state, make ``device`` the MMIO handler."""
        ...

    def run(self, program: Program) -> Stop:
        """Run the guest until it stops (the next ``hlt``, or for good)."""
        ...

    def vcpu_stats(self) -> Mapping[str, Any]: ...

    def mmio_log(self) -> Iterable[MmioRecord]: ...

    def regs(self) -> dict[str, int]: ...

    def finish(self, obs: Observation) -> None:
        """Add what only this backend records (before it is closed)."""
        ...

    def close(self) -> None: ...


def _counter(stats: Mapping[str, StatValue], name: str) -> int:
    """One of COUNTERS in a statistics delta: a plain count (a histogram's buckets are no counter)."""
    value = stats.get(name, 0)
    if not isinstance(value, int):
        raise TypeError(f"statistic {name!r} is a histogram, not a counter: {value!r}")
    return value


def observe(program: Program, backend: Backend, image: GuestImage) -> Observation:
    """The one observation loop: memslots and memory image, the entry state, ``program.runs`` runs
    with the ``between`` actions after each ``hlt``, then every observable."""
    obs = Observation(backend.name)
    try:
        vm = backend.vm
        touch = _guest_pages(program, image) if program.prefault else set()
        live: set[int] = set()

        def add_slot(s: Slot) -> None:
            # A new slot's reachable pages are written by the VMM (Program.prefault); a changed one is not.
            fresh = s.size and s.slot not in live
            vm.set_user_memory_region(s.slot, s.gpa, s.size, s.flags)
            if s.size:
                live.add(s.slot)
            else:
                live.discard(s.slot)
            if fresh:
                _prefault(vm, s, touch)

        for s in program.slots:
            add_slot(s)
        for gpa, data in image.writes():
            vm.write_phys(gpa, data)
        backend.start(image, Device(program))
        v0, m0 = dict(backend.vcpu_stats()), dict(vm.stats)
        for i in range(program.runs):
            stop = backend.run(program)
            obs.stops.append(stop.reason)
            if stop.error is not None:
                obs.error = stop.error
                break
            dv, dm = stats_delta(v0, backend.vcpu_stats()), stats_delta(m0, vm.stats)
            obs.per_run.append({n: _counter(dm if n in VM_COUNTERS else dv, n) for n in COUNTERS})
            if stop.note is not None:
                obs.notes.append(stop.note)
            if stop.reason != "hlt":
                break
            if i < len(program.between):
                for action in program.between[i]:
                    if isinstance(action, Slot):
                        add_slot(action)
                    elif isinstance(action, WritePhys):
                        vm.write_phys(action.gpa, action.data)
        dv, dm = stats_delta(v0, backend.vcpu_stats()), stats_delta(m0, vm.stats)
        obs.mmio = [Mmio(a.phys_addr, a.len, a.is_write, bytes(a.data or b"")) for a in backend.mmio_log()]
        obs.memory = _capture_memory(program, vm.read_phys)
        if backend.binary_stats:
            obs.stats = {**{n: v for n, v in dv.items() if isinstance(v, int) and v},
                         **{f"vm.{n}": v for n, v in dm.items() if isinstance(v, int) and v}}
        for name in COUNTERS + EXTRA_COUNTERS:
            value = (dm if (name in VM_COUNTERS or name in _VM_EXTRA) else dv).get(name, 0)
            (obs.counters if name in COUNTERS else obs.extra)[name] = int(value) if isinstance(value, int) else 0
        obs.regs = backend.regs()
        backend.finish(obs)
    finally:
        backend.close()
    obs.faults, obs.fault_count = _decode_log(obs.memory.get(RT_LOG, bytes(4096)))
    return obs


# -- the model backend ------------------------------------------------------------------------------------
class ModelBackend:
    """kvmmu's VM under a host profile (kvmmu.kvm.profiles), the guest run by the software CPU."""

    binary_stats = False

    def __init__(self, program: Program, profile: str | HostProfile = "kvm-pvm", trace: bool = False) -> None:
        from ..kvm.profiles import get_profile

        self.profile = get_profile(profile)
        if self.profile.cmps_source_first is None:
            # A profile whose CMPS order is the running CPU's: measured here, once per process.
            from dataclasses import replace

            from .cmps_order import host_cmps_source_first
            self.profile = replace(self.profile, cmps_source_first=host_cmps_source_first()[0])
        self.name = f"model:{self.profile.name}"
        self.vm = self.profile.make_vm(host_hugepage_level=2 if program.host_hugepages else 1)
        self.events: list[tuple[str, dict[str, Any]]] = []
        if trace:
            # A subscriber, not the bounded ring: a long program's early events must not be dropped.
            self.vm.trace.subscribe(lambda e: self.events.append((e.name, dict(e.fields))))

    def start(self, image: GuestImage, device: Device) -> None:
        from ..hw.x86cpu import X86Cpu

        img = image
        self.vm.mmio_handler = device
        self.vcpu = vcpu = self.vm.create_vcpu()
        vcpu.set_sregs(cr0=img.cr0, cr3=img.cr3, cr4=img.cr4, efer=img.efer, cpl=img.cpl, rflags=img.rflags)
        bus = self.profile.make_bus(vcpu)
        self.cpu = X86Cpu(bus, rip=img.rip, rsp=img.rsp, rflags=img.rflags, cpl=img.cpl, cr0=img.cr0,
                          cr3=img.cr3, cr4=img.cr4, efer=img.efer, gdt=img.gdt, idt=img.idt, tss=img.tss)
        bus.cpu = self.cpu

    def run(self, program: Program) -> Stop:
        from ..hw.x86cpu import StepLimitExceeded, UnsupportedInstruction

        try:
            return Stop(self.cpu.run(program.max_steps))
        except StepLimitExceeded as e:
            return Stop("step_limit", error=str(e))
        except UnsupportedInstruction as e:
            return Stop("unsupported", error=str(e))

    def vcpu_stats(self) -> Mapping[str, Any]:
        return self.vcpu.stats

    def mmio_log(self) -> Iterable[MmioRecord]:
        return self.vm.mmio_log

    def regs(self) -> dict[str, int]:
        cpu = self.cpu
        regs = dict(zip(_X86_ORDER, cpu.regs, strict=True))
        regs["rip"] = cpu.rip
        regs["rflags"] = cpu.rflags
        return regs

    def finish(self, obs: Observation) -> None:
        obs.undefined, obs.undefined_regs, obs.undefined_uses = undefined_mask.collect(self.cpu, self.vcpu)
        obs.events = self.events

    def close(self) -> None:
        pass


def run_model(program: Program, profile: str | HostProfile = "kvm-pvm", image: GuestImage | None = None,
              trace: bool = False) -> Observation:
    """Run ``program`` on the model under a host profile (kvmmu.kvm.profiles); ``trace`` keeps the
    model's trace events in ``Observation.events``."""
    return observe(program, ModelBackend(program, profile, trace), image or build(program))


# -- the real backend ------------------------------------------------------------------------------------
class RealBackend:
    """The real /dev/kvm (kvmmu.real), the guest entered with KVM_RUN."""

    name = "real"
    binary_stats = True

    def __init__(self, program: Program, timeout: float = 5.0) -> None:
        from ..real import RealVM

        self.timeout = timeout
        self.vm = RealVM(hugepages=program.host_hugepages)

    def start(self, image: GuestImage, device: Device) -> None:
        from ..real import flat_long_mode_sregs

        img = image
        self.device = device
        self.vcpu = vcpu = self.vm.create_vcpu()
        sregs = flat_long_mode_sregs(img.gdt[0], img.idt[0], img.tss[0], img.cr3, img.cpl, img.idt[1],
                                     img.cr0, img.cr4, img.efer)
        sregs["cr0"], sregs["cr4"], sregs["efer"] = img.cr0, img.cr4, img.efer
        vcpu.set_sregs(**sregs)
        regs = dict.fromkeys(REG_NAMES, 0)
        regs.update(rip=img.rip, rsp=img.rsp, rflags=img.rflags)
        vcpu.set_regs(**regs)

    def run(self, program: Program) -> Stop:
        ex = self.vcpu.run(mmio_handler=self.device, max_exits=1_000_000, timeout=self.timeout)
        return Stop(ex.reason if ex.reason != "intr" else "timeout",
                    note=str(ex) if ex.reason == "internal_error" else None)

    def vcpu_stats(self) -> Mapping[str, Any]:
        return self.vcpu.stats

    def mmio_log(self) -> Iterable[MmioRecord]:
        return self.vcpu.mmio_log

    def regs(self) -> dict[str, int]:
        final = self.vcpu.get_regs()
        return {k: final[k] for k in REG_NAMES}

    def finish(self, obs: Observation) -> None:
        pass

    def close(self) -> None:
        self.vm.close()


def run_real(program: Program, image: GuestImage | None = None, timeout: float = 5.0) -> Observation:
    """Run ``program`` once on the real /dev/kvm (kvmmu.real)."""
    img = image or build(program)
    return observe(program, RealBackend(program, timeout), img)
