"""Scenario files: a host, its VMs (machine + guest OS + workload), the seed and the modelled duration.

A scenario is a TOML file (see docs/cli.md for every key):

    name = "three compiling guests"
    seed = 1
    duration_s = 0.5              # modelled seconds of host time

    [host]
    cores = 4
    memory_mib = 2048             # optional: a host memory limit (swapping); none by default
    reserved_mib = 512            # host memory not available to guests (host OS, VMM processes)

    [os]                          # the guest OS of every VM unless a VM says otherwise
    hz = 250

    [workload]                    # the workload of every VM unless a VM says otherwise
    kind = "kernel-compile"

    [cost]                        # cost-model overrides (cycles per event)
    vm_exit = 1000

    [[vm]]
    name = "guest"
    count = 3                     # three identical VMs: guest0, guest1, guest2
    ram_mib = 512
    vcpus = 4
    mmu = "shadow"                # shadow | ept | npt
    mmio_caching = "generation"   # off | zap | generation

Every error names the file, the key, the value and the rule (`ScenarioError`), and the CLI prints
it on one line and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidArgument, KvmmuError, ScenarioError
from .guest.os import GuestOS, OsParams
from .guest.vcpu_stats import vcpu_totals
from .guest.workloads import WORKLOADS, Workload, make_workload
from .hw.host import Host
from .kvm.params import KvmParams
from .kvm.vm import MMIO_POLICIES, MMU_FLAVOURS
from .sim.clock import Clock
from .sim.cost import CostModel
from .sim.textfile import read_text
from .vmm.machine import Machine, MachineSpec
from .vmm.runner import HostRunner

MiB = 1 << 20
_TOP_KEYS = {"name": str, "seed": int, "duration_s": (int, float), "slice_us": (int, float), "description": str,
             "sample_ms": (int, float), "host": dict, "os": dict, "workload": dict, "cost": dict, "vm": list}
_HOST_KEYS = {"cores": int, "memory_mib": int, "reserved_mib": int, "maxphyaddr": int}
_VM_KEYS = {"name": str, "count": int, "ram_mib": int, "vcpus": int, "mmu": str, "mmio_caching": str,
            "pci_hole_start": int, "framebuffer_mib": int, "kernel_irqchip": bool, "ioeventfd": bool, "msix": bool,
            "nic": str, "mmu_pages": (int, str), "initial_generation": int, "tdp_mmu": bool, "os": dict,
            "workload": dict}
_OS_FIELDS = {f.name: f for f in dataclasses.fields(OsParams)}


MAX_FILE_BYTES = 1 << 20            # a scenario or cost file is a page of text, not megabytes
MAX_SAMPLES = 100_000               # points of a time series (duration_s * 1000 / sample_ms)
U64 = 1 << 64


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """TOML text as a dict; every way it can be malformed is a ScenarioError naming `source`."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{source}: not valid TOML: {e}") from None
    except RecursionError:
        raise ScenarioError(f"{source}: not valid TOML: tables or arrays nested too deeply") from None
    except ValueError as e:                        # e.g. an integer of thousands of digits
        raise ScenarioError(f"{source}: not valid TOML: {str(e)[:120]}") from None


def _finite(where: str, key: str, value: Any, lo: float, hi: float, rule: str) -> float:
    """A number that is finite and in [lo, hi] (NaN fails every comparison, so it is tested first)."""
    v = float(value)
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ScenarioError(f"{where}: {key} = {value!r}: {rule}")
    return v


def _check_samples(where: str, key: str, sample_ms: float, duration_s: float) -> None:
    if sample_ms and sample_ms < 0.001:
        raise ScenarioError(f"{where}: {key} = {sample_ms!r}: a sampling period is 0 (none) or at least 0.001 ms")
    if sample_ms and duration_s * 1000 / sample_ms > MAX_SAMPLES:
        raise ScenarioError(f"{where}: {key} = {sample_ms!r}: at most {MAX_SAMPLES:,} samples, so at least "
                            f"{duration_s * 1000 / MAX_SAMPLES:g} ms for a duration of {duration_s:g} s")


def _type_name(t: Any) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table",
            list: "an array of tables"}[t]


def _check_type(where: str, key: str, value: Any, t: Any) -> None:
    ts = t if isinstance(t, tuple) else (t,)
    ok = any(isinstance(value, x) and not (x in (int, float) and isinstance(value, bool)) for x in ts)
    if not ok:
        raise ScenarioError(f"{where}: {key} = {value!r}: expected {_type_name(t)}")


def _check_keys(where: str, table: dict, known: dict) -> None:
    for k, v in table.items():
        if k not in known:
            raise ScenarioError(f"{where}: unknown key {k!r} (known: {', '.join(sorted(known))})")
        _check_type(where, k, v, known[k])


@dataclass
class VmPlan:
    spec: MachineSpec
    os: OsParams
    workload_kind: str
    workload_params: dict[str, Any]


@dataclass
class Scenario:
    """A validated scenario, ready to run."""

    name: str = "scenario"
    seed: int = 1
    duration_s: float = 0.1
    slice_us: float = 1000.0
    sample_ms: float = 0.0
    host_cores: int = 4
    host_memory_mib: int | None = None
    host_reserved_mib: int = 0
    host_maxphyaddr: int = 46
    vms: list[VmPlan] = field(default_factory=list)
    cost: CostModel = field(default_factory=CostModel)
    source: str = "<scenario>"

    # -- loading --------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Scenario:
        p = Path(path)
        text = read_text(p, f"scenario {str(p)!r}", MAX_FILE_BYTES,
                         f"{MAX_FILE_BYTES >> 20} MiB, not a scenario", "a TOML file", "; TOML files are UTF-8")
        return cls.loads(text, str(p))

    @classmethod
    def loads(cls, text: str, source: str = "<scenario>") -> Scenario:
        return cls.from_dict(parse_toml(text, source), source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<scenario>") -> Scenario:
        _check_keys(source, data, _TOP_KEYS)
        sc = cls(source=source)
        sc.name = data.get("name", Path(source).stem if source != "<scenario>" else "scenario")
        sc.seed = data.get("seed", 1)
        if not 0 <= sc.seed < U64:
            raise ScenarioError(f"{source}: seed = {sc.seed!r}: a seed is 0 to 2^64-1")
        sc.duration_s = _finite(source, "duration_s", data.get("duration_s", 0.1), 0, 86400,
                                "the modelled duration is > 0 and at most 86400 seconds")
        if sc.duration_s == 0:
            raise ScenarioError(f"{source}: duration_s = 0: the modelled duration is > 0 and at most 86400 seconds")
        sc.slice_us = _finite(source, "slice_us", data.get("slice_us", 1000.0), 10, 1e6,
                              "a host timeslice is 10 us to 1 s")
        sc.sample_ms = _finite(source, "sample_ms", data.get("sample_ms", 0.0), 0, sc.duration_s * 1000,
                               "a sampling period is 0 (none) or a number of ms up to the duration")
        _check_samples(source, "sample_ms", sc.sample_ms, sc.duration_s)
        host = data.get("host", {})
        _check_keys(f"{source}: [host]", host, _HOST_KEYS)
        sc.host_cores = host.get("cores", 4)
        if not 1 <= sc.host_cores <= 1024:
            raise ScenarioError(f"{source}: [host] cores = {sc.host_cores!r}: a host has 1 to 1024 cores")
        sc.host_memory_mib = host.get("memory_mib")
        sc.host_reserved_mib = host.get("reserved_mib", 0)
        for key, value in (("memory_mib", sc.host_memory_mib), ("reserved_mib", sc.host_reserved_mib)):
            if value is not None and value > 1 << 30:
                raise ScenarioError(f"{source}: [host] {key} = {value!r}: at most 2^30 MiB (1 EiB)")
        sc.host_maxphyaddr = host.get("maxphyaddr", 46)
        if not 36 <= sc.host_maxphyaddr <= 52:
            raise ScenarioError(f"{source}: [host] maxphyaddr = {sc.host_maxphyaddr!r}: between 36 and 52")
        if sc.host_reserved_mib < 0:
            raise ScenarioError(f"{source}: [host] reserved_mib = {sc.host_reserved_mib!r}: must be >= 0")
        if sc.host_memory_mib is not None and not sc.host_memory_mib >= 16:
            raise ScenarioError(f"{source}: [host] memory_mib = {sc.host_memory_mib!r}: a host has at least 16 MiB")
        if sc.host_memory_mib is not None and sc.host_reserved_mib >= sc.host_memory_mib:
            raise ScenarioError(f"{source}: [host] reserved_mib = {sc.host_reserved_mib!r}: impossible layout: the "
                                f"host's own reservation must leave room below memory_mib = {sc.host_memory_mib}")
        if "cost" in data:
            try:
                sc.cost = CostModel.from_mapping(data["cost"], f"{source}: [cost]")
            except ScenarioError:
                raise
        os_default = data.get("os", {})
        wl_default = data.get("workload")
        vms = data.get("vm")
        if not vms:
            raise ScenarioError(f"{source}: missing key 'vm': a scenario needs at least one [[vm]] table")
        names: set[str] = set()
        for i, vm in enumerate(vms):
            where = f"{source}: [[vm]] #{i + 1}"
            if not isinstance(vm, dict):
                raise ScenarioError(f"{where}: expected a table")
            _check_keys(where, vm, _VM_KEYS)
            count = vm.get("count", 1)
            if not 1 <= count <= 64:
                raise ScenarioError(f"{where}: count = {count!r}: 1 to 64 copies of a VM")
            base = vm.get("name", f"vm{i}")
            osp = sc._os_params(where, {**os_default, **vm.get("os", {})})
            wl = vm.get("workload", wl_default)
            if wl is None:
                raise ScenarioError(f"{where}: missing key 'workload': give the VM a [vm.workload] table or the "
                                    "scenario a [workload] table")
            wl = dict(wl)
            kind = wl.pop("kind", None)
            if kind is None:
                raise ScenarioError(f"{where}: missing key 'workload.kind' (one of {sorted(WORKLOADS)})")
            try:
                make_workload(kind, wl)
            except InvalidArgument as e:
                raise ScenarioError(f"{where}: {e}") from None
            except TypeError as e:
                raise ScenarioError(f"{where}: workload: {e}") from None
            for k in range(count):
                name = f"{base}{k}" if count > 1 else base
                if name in names:
                    raise ScenarioError(f"{where}: name = {name!r}: two VMs have the same name")
                names.add(name)
                kw = {key: vm[key] for key in _VM_KEYS if key in vm and key not in ("name", "count", "os", "workload")}
                spec = MachineSpec(name=name, **kw)
                try:
                    spec.validate()
                except InvalidArgument as e:
                    raise ScenarioError(f"{where}: {e}") from None
                sc.vms.append(VmPlan(spec, osp, kind, wl))
        if sc.host_memory_mib is not None:
            total = sum(v.spec.ram_mib for v in sc.vms)
            if sc.host_memory_mib - sc.host_reserved_mib < 64:
                raise ScenarioError(f"{source}: [host] memory_mib = {sc.host_memory_mib}: impossible layout: less "
                                    f"than 64 MiB left for {total} MiB of guest RAM after reserved_mib")
        return sc

    @staticmethod
    def _os_params(where: str, table: dict[str, Any]) -> OsParams:
        for k, v in table.items():
            f = _OS_FIELDS.get(k)
            if f is None:
                raise ScenarioError(f"{where}: [os] unknown key {k!r} (known: {', '.join(sorted(_OS_FIELDS))})")
            t = {int: int, float: (int, float), str: str}[type(f.default)]
            _check_type(f"{where}: [os]", k, v, t)
        p = OsParams(**table)
        try:
            p.validate()
        except InvalidArgument as e:
            raise ScenarioError(f"{where}: {e}") from None
        return p

    # -- variations -----------------------------------------------------------------------------------
    def with_policy(self, mmu: str | None = None, mmio_caching: str | None = None,
                    tdp_mmu: bool | None = None) -> Scenario:
        """The same scenario with every VM's MMU flavour, MMIO policy and / or kvm.tdp_mmu replaced."""
        if mmu is not None and mmu not in MMU_FLAVOURS:
            raise ScenarioError(f"--mmu {mmu!r}: the MMU flavours are {list(MMU_FLAVOURS)}")
        if mmio_caching is not None and mmio_caching not in MMIO_POLICIES:
            raise ScenarioError(f"--policy {mmio_caching!r}: the MMIO policies are {list(MMIO_POLICIES)}")
        out = dataclasses.replace(self, vms=[])
        for v in self.vms:
            spec = dataclasses.replace(v.spec, mmu=mmu or v.spec.mmu, mmio_caching=mmio_caching or v.spec.mmio_caching,
                                       tdp_mmu=v.spec.tdp_mmu if tdp_mmu is None else tdp_mmu)
            out.vms.append(VmPlan(spec, v.os, v.workload_kind, dict(v.workload_params)))
        return out

    def scaled(self, duration_s: float | None = None, seed: int | None = None) -> Scenario:
        out = dataclasses.replace(self, vms=list(self.vms))
        if duration_s is not None:
            if not (math.isfinite(duration_s) and 0 < duration_s <= 86400):
                raise ScenarioError(f"--duration {duration_s!r}: the modelled duration is > 0 and at most 86400 s")
            out.duration_s = duration_s
            _check_samples(f"--duration {duration_s:g}", "sample_ms", out.sample_ms, duration_s)
        if seed is not None:
            if not 0 <= seed < U64:
                raise ScenarioError(f"--seed {seed}: a seed is 0 to 2^64-1")
            out.seed = seed
        return out

    # -- running --------------------------------------------------------------------------------------
    def build(self) -> tuple[Host, list[Machine], list[GuestOS], list[Workload]]:
        host = Host(maxphyaddr=self.host_maxphyaddr,
                    memory_limit=None if self.host_memory_mib is None else self.host_memory_mib * MiB,
                    reserved=self.host_reserved_mib * MiB, cores=self.host_cores)
        machines, oses, workloads = [], [], []
        clock = Clock()                   # one event order for every guest on this host
        for plan in self.vms:
            m = Machine(plan.spec, host)
            os_ = GuestOS(m, plan.os, seed=self.seed, cost=self.cost, clock=clock)
            os_.boot()
            w = make_workload(plan.workload_kind, plan.workload_params)
            w.setup(os_)
            os_.workload = w
            machines.append(m)
            oses.append(os_)
            workloads.append(w)
        return host, machines, oses, workloads

    def run(self, progress: Callable[[float], None] | None = None,
            on_built: Callable[[list[Machine], list[GuestOS]], None] | None = None) -> ScenarioResult:
        try:
            host, machines, oses, workloads = self.build()
        except KvmmuError:
            raise
        if on_built is not None:
            on_built(machines, oses)
        ghz = self.vms[0].os.ghz
        duration = int(self.duration_s * ghz * 1e9)
        series: list[dict[str, Any]] = []
        if self.sample_ms > 0:
            period = int(self.sample_ms * 1e-3 * ghz * 1e9)

            def sample(t: int) -> None:
                series.append({"t_s": t / (ghz * 1e9), **_totals(machines, oses)})
                oses[0].vmm_at(t + period, sample)
            oses[0].vmm_at(period, sample)
        runner = HostRunner(host, oses, seed=self.seed, slice_us=self.slice_us, progress=progress)
        rs = runner.run(duration)
        for m in machines:
            m.vm.audit()
        return ScenarioResult.collect(self, host, machines, oses, workloads, rs.host_cycles / (ghz * 1e9),
                                      rs.stopped_by, series)


_MISS_KEYS = ("mmio_accesses", "mmio_fast_path", "mmio_slow_path", "mmio_to_userspace")


_SAMPLED_STATS = ("exits", "pf_taken", "pf_fixed", "pf_emulate", "pf_mmio_spte_created", "mmio_exits")
_SAMPLED_COUNTERS = ("guest_walks", "memslot_searches", "shadow_walks", "host_swapins")
# The counters of a scenario's time series (`sample_ms`; what `kvmmu plot --kind series` can draw).
SAMPLED = (*_SAMPLED_STATS, *_SAMPLED_COUNTERS, *_MISS_KEYS)


def _totals(machines: list[Machine], oses: list[GuestOS]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m, o in zip(machines, oses, strict=True):
        for v in m.vcpus:
            for k in _SAMPLED_STATS:
                out[k] = out.get(k, 0) + v.stats[k]
            for k in _SAMPLED_COUNTERS:
                out[k] = out.get(k, 0) + v.counters[k]
        for k in _MISS_KEYS:
            out[k] = out.get(k, 0) + o.counters[k]
    return out


@dataclass
class VmResult:
    name: str
    mmu: str
    mmio_caching: str
    vcpus: int
    stats: dict[str, int]            # KVM vCPU stats summed over the VM's vCPUs
    counters: dict[str, int]         # model counters summed over the vCPUs
    vm_stats: dict[str, int]         # KVM VM stats
    guest: dict[str, int]            # the guest OS's own counters
    workload: dict[str, Any]
    devices: dict[str, dict[str, Any]]
    cost: dict[str, tuple[int, int]]     # category -> (events, cycles)
    native_cycles: int
    kvm_params: KvmParams = field(default_factory=KvmParams)   # the module parameters, as the VM reads them

    @property
    def overhead_cycles(self) -> int:
        return sum(c for _, c in self.cost.values())

    def metric(self, name: str) -> Any:
        for d in (self.stats, self.counters, self.vm_stats, self.guest, self.workload):
            if name in d:
                return d[name]
        raise KeyError(name)


@dataclass
class ScenarioResult:
    name: str
    seed: int
    duration_s: float
    modelled_s: float
    stopped_by: str
    vms: list[VmResult]
    host: dict[str, int]
    series: list[dict[str, Any]]
    cost_model: dict[str, int]

    @classmethod
    def collect(cls, sc: Scenario, host: Host, machines: list[Machine], oses: list[GuestOS],
                workloads: list[Workload], modelled_s: float, stopped_by: str,
                series: list[dict[str, Any]]) -> ScenarioResult:
        vms = []
        for m, o, w in zip(machines, oses, workloads, strict=True):
            stats, counters = vcpu_totals(m.vcpus)
            vm_stats = dict(m.vm.stats)
            vms.append(VmResult(m.spec.name, m.spec.mmu, m.spec.mmio_caching, m.spec.vcpus, stats, counters,
                                vm_stats, o.summary(), w.result(o), m.device_counts(),
                                sc.cost.by_category(stats, counters, vm_stats, m.spec.mmu),
                                o.counters["native_cycles"], m.vm.params))
        hostd = {"cores": host.cores, "memory_limit_mib": (host.memory_limit or 0) // MiB,
                 "swapins": host.swapins, "swapouts": host.swapouts, "resident_pages": len(host.resident),
                 "kvm_kernel_pages": host.kernel_pages_in_use}
        return cls(sc.name, sc.seed, sc.duration_s, round(modelled_s, 6), stopped_by, vms, hostd, series,
                   sc.cost.as_dict())

    def total(self, name: str) -> int:
        return sum(v.metric(name) for v in self.vms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.name, "seed": self.seed, "duration_s": self.duration_s, "modelled_s": self.modelled_s,
            "stopped_by": self.stopped_by, "host": self.host, "cost_model": self.cost_model,
            "vms": [{"name": v.name, "mmu": v.mmu, "mmio_caching": v.mmio_caching, "vcpus": v.vcpus,
                     "kvm_params": v.kvm_params.sysfs(),
                     "kvm_vcpu_stats": v.stats, "kvm_vm_stats": v.vm_stats, "model_counters": v.counters,
                     "guest": v.guest, "workload": v.workload, "devices": v.devices,
                     "cost": {k: {"events": e, "cycles": c} for k, (e, c) in v.cost.items()},
                     "native_cycles": v.native_cycles, "overhead_cycles": v.overhead_cycles}
                    for v in self.vms],
            "series": self.series,
        }
