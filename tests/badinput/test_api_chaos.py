"""API chaos: random sequences of public calls with a mix of valid and hostile arguments.

The promise (docs/reliability.md, "Nothing crashes the model"): every call either returns or raises a
kvmmu error that names the value and the rule; a refused call changes nothing; vm.audit() holds
after every step.  Guest-caused conditions are results, never exceptions.  A KvmBug, an AuditError
or any non-kvmmu exception (TypeError, KeyError, ...) escaping a public call is a bug.  No result is
checked for architectural correctness here: tests/fuzz does that against its own reference.

Each step draws how hostile it is: most steps pass only valid arguments (so that the VMs get into
deep states: mapped tables, shadow pages, MMIO sptes, nested guests), the others replace some
arguments by a value that breaks a rule of that parameter or by one of HOSTILE (wrong type, negative,
beyond 2^64, ...).

A bug found here gets a minimal reproducer below, marked xfail(strict=True) while it is open (the
generator then avoids exactly that case, with a comment naming the reproducer); none is open.

Fast profile (default, part of `make test`): derandomized, the same examples every run.
Long profile, for hunting (random unless `--hypothesis-seed` is given; KVMMU_CHAOS_STEPS steps per
example, 40 by default); with KVMMU_CHAOS_COLLECT=file every failure is logged (signature, message,
the VMs and every step) and the run goes on:

    KVMMU_CHAOS_PROFILE=long KVMMU_CHAOS_EXAMPLES=2000 KVMMU_CHAOS_COLLECT=/tmp/chaos.jsonl \\
        .venv/bin/python -m pytest tests/badinput/test_api_chaos.py -k test_api_chaos
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import kvmmu
from kvmmu.arch.bits import (
    EFER_LME,
    EFER_NX,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR0_WP,
    X86_CR4_LA57,
    X86_CR4_PAE,
    X86_CR4_PGE,
    X86_CR4_PKE,
    X86_CR4_PSE,
    X86_CR4_SMAP,
    X86_CR4_SMEP,
    X86_EFLAGS_AC,
)
from kvmmu.guest.pagetables import EPT_RWX, EPT_WB, NX, PS, RW, US, GuestPageTables, P, vcpu_writer, vm_writer
from kvmmu.kvm.mmu.spte import MmioGenLayout
from tests.badinput.snapshot import assert_unchanged, running_vm, shown, vm_state

STEPS = int(os.environ.get("KVMMU_CHAOS_STEPS", "40"))
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
LONG = settings(max_examples=int(os.environ.get("KVMMU_CHAOS_EXAMPLES", "500")), deadline=None,
                derandomize=False, database=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate])
PROFILE = LONG if os.environ.get("KVMMU_CHAOS_PROFILE") == "long" else FAST


class HandlerBoom(Exception):
    """Raised on purpose by a VMM callback (MMIO handler, in-kernel device, during_update): it may
    propagate out of the call that ran the callback."""


# Values no parameter of the API accepts as an address, size, register or flag word.
HOSTILE: list[object] = [
    -1, -0x1000, 1 << 64, (1 << 64) + 0x1000, 1 << 200, 0.5, 4096.0, float("nan"), float("inf"), None,
    "0x1000", "", True, False, b"", b"\x01\x02\x03", bytearray(9), [0x1000], (1, 2), {"a": 1}, object(), 1j,
]

U64 = (1 << 64) - 1
GPAS = [0, 0x1000, 0x10_0000, 0x20_0000, 0x40_0000, 0x200_0000, 0xD000_0000, 0xFEE0_0000, 1 << 32, 1 << 40,
        1 << 47, 1 << 48, 0x7FFF_F000]
BAD_GPAS = [0x123, U64 & ~0xFFF, 1 << 52]
SIZES = [0, 0x1000, 0x4000, 0x10000, 0x10_0000, 0x20_0000, 0x40_0000]
BAD_SIZES = [0x800, 0x1001, 1 << 43]
# Every u64 is a valid access address (non-canonical ones are the guest's #GP, beyond 4 GiB with 32-bit
# addressing InvalidArgument); the low ones, which every mode can reach, are drawn more often.
GVAS = [0, 0x1000, 0x40_0000, 0x40_0FFC, 0x40_0FFF, 0x50_0000, 0x60_0000, 0xD000_0000, 0xFEE0_0000, 0xFFFF_FFFC] * 3 \
    + [0xFFFF_FFFF, 1 << 32, 0x7FFF_FFFF_F000, 0x7FFF_FFFF_FFFC, 0xFFFF_8000_0000_0000, 0x8000_0000_0000_0000,
       0x00FF_FFFF_FFFF_FFF8, U64 - 7, U64]
MAP_GVAS = [0, 0x1000, 0x20_0000, 0x40_0000, 0x40_1000, 0x40_2000, 0x50_0000, 0x60_0000, 0x4000_0000, 0xFEE0_0000]
MODES = ["32bit", "pae", "4level", "5level", "ept4", "ept5"]
# Each mode's tables come from a pool of their own inside the first 4 MiB.
POOLS = {"32bit": 0x10_0000, "pae": 0x12_0000, "4level": 0x14_0000, "5level": 0x16_0000, "ept4": 0x18_0000,
         "ept5": 0x1A_0000}
PG = X86_CR0_PG | X86_CR0_PE | X86_CR0_WP
# (cr0, cr4, efer, tables): the paging modes a vCPU is put in (the last two are refused).
REG_MODES = [
    (0, 0, 0, None), (X86_CR0_PE, 0, 0, None), (PG, 0, 0, "32bit"), (PG, X86_CR4_PSE, EFER_NX, "32bit"),
    (PG, X86_CR4_PAE, EFER_NX, "pae"), (PG, X86_CR4_PAE, EFER_LME | EFER_NX, "4level"),
    (PG, X86_CR4_PAE, EFER_LME | EFER_NX, "4level"), (PG, X86_CR4_PAE | X86_CR4_LA57, EFER_LME | EFER_NX, "5level"),
    (PG, X86_CR4_PAE | X86_CR4_SMEP | X86_CR4_SMAP | X86_CR4_PKE | X86_CR4_PGE, EFER_LME | EFER_NX, "4level"),
    (PG, X86_CR4_LA57, EFER_LME, None), (PG, 0, EFER_LME, None),
]
CR_BITS = [X86_CR0_PG, X86_CR0_PE, X86_CR0_WP, 1 << 29, 1 << 30, X86_CR4_PAE, X86_CR4_PSE, X86_CR4_PGE,
           X86_CR4_SMEP, X86_CR4_SMAP, X86_CR4_PKE, X86_CR4_LA57, EFER_LME, EFER_NX, 1 << 63, 1 << 40, 0]


# -- the VMM's callbacks, well behaved and not --------------------------------------------------------
class Device:
    """An in-kernel device whose read returns `reply` (a value, or an exception to raise)."""

    def __init__(self, reply: object = 0x55, handles_writes: object = True) -> None:
        self.reply, self.handles_writes = reply, handles_writes

    def read(self, addr: int, length: int) -> object:
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply

    def write(self, addr: int, length: int, value: int) -> object:
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.handles_writes

    def __repr__(self) -> str:
        return f"Device({self.reply!r}, {self.handles_writes!r})"


class NoWrite:
    """Half a device: it can be read but has no write()."""

    def read(self, addr: int, length: int) -> int:
        return 0


DEVICES: list[object] = [Device(), Device(None), Device(None, False), Device(1 << 70), Device(-1),
                         Device(0x55, None), Device(0x55, "yes")]
BAD_DEVICES: list[object] = [Device(b"\x01\x02"), Device(1.5), Device("x"), Device(HandlerBoom("device")), NoWrite(),
                             object(), None, "device", 5]


def _reply(value: object) -> Callable[[kvmmu.MmioExit], object]:
    def handler(exit_: kvmmu.MmioExit) -> object:
        if isinstance(value, BaseException):
            raise value
        return value
    handler.__qualname__ = f"handler->{value!r}"
    return handler


HANDLERS: list[object] = [_reply(v) for v in (0x1234, None, 0, -1, 1 << 70, b"", b"\x01", b"\x01" * 20,
                                              bytearray(b"\x02\x03"), True)] + [None]
BAD_HANDLERS: list[object] = [_reply(v) for v in (1.5, "str", [1], HandlerBoom("handler"))] + [5, "not callable"]


# -- drawing arguments --------------------------------------------------------------------------------------
class Picker:
    """Draws one step's arguments; each is bad (from the parameter's own bad values or HOSTILE) with
    probability `rate` percent, drawn once per step."""

    def __init__(self, data: st.DataObject, rate: int) -> None:
        self.data, self.rate = data, rate

    def draw(self, strategy: st.SearchStrategy, label: str | None = None) -> object:
        return self.data.draw(strategy, label=label)

    def __call__(self, valid: Sequence[object] | st.SearchStrategy, label: str,
                 bad: Sequence[object] = ()) -> object:
        if self.rate and self.draw(st.integers(0, 99)) < self.rate:
            return self.draw(st.sampled_from([*bad, *HOSTILE]), label=f"{label} (bad)")
        strategy = valid if isinstance(valid, st.SearchStrategy) else st.sampled_from(list(valid))
        return self.draw(strategy, label=label)

    def some(self, n: int) -> bool:
        """True one time in n."""
        return self.draw(st.integers(0, n - 1)) == 0


# -- the world ------------------------------------------------------------------------------------------
@dataclass
class VmCtx:
    name: str                 # "vm0", "vm1": how the steps name it
    vm: kvmmu.VM
    vcpus: list[kvmmu.Vcpu] = field(default_factory=list)
    pts: dict[str, GuestPageTables] = field(default_factory=dict)


@dataclass
class World:
    host: kvmmu.Host
    vms: list[VmCtx]
    steps: list[str] = field(default_factory=list)


def host_kwargs(pk: Picker) -> dict[str, object]:
    kw: dict[str, object] = {}
    if pk.some(2):
        kw["maxphyaddr"] = pk.draw(st.sampled_from([36, 39, 46, 48, 51, 52, 35, 53, -1, 1 << 64, 0.5, float("nan"),
                                                    True, "46", 46.0, None]), label="host maxphyaddr")
    if pk.some(4):
        kw["memory_limit"] = pk([None, 1 << 20, 4 << 20, 16 << 20, 64 << 20], "memory_limit", [(1 << 20) - 1, 0])
    if pk.some(4):
        kw["reserved"] = pk([0, 0x1000, 1 << 20], "reserved", [1 << 30])
    if pk.some(4):
        kw["cores"] = pk([1, 2, 64], "cores", [0])
    return kw


VM_OPTIONS: dict[str, tuple[list[object], list[object]]] = {     # name: (valid, bad)
    "address_spaces": ([1, 2], [3, 0]),
    "initial_generation": ([0, 2, (1 << 19) - 8, (1 << 62) - 2], [3, 1 << 62]),
    "guest_maxphyaddr": ([32, 36, 46, 52], [31, 53]),
    "guest_gbpages": ([True, False], []),
    "max_mmu_pages": ([None, 64, 100], [63, 0]),
    "mmio_gen_layout": ([None, MmioGenLayout(), MmioGenLayout(3, 9, 52, 62), MmioGenLayout(3, 3, 62, 62)],
                        [MmioGenLayout(0, 20, 40, 70), MmioGenLayout(10, 3, 52, 62), "layout"]),
    "tdp_level": ([4, 5], [3]),
    "host_hugepage_level": ([1, 2, 3], [0, 4]),
    "ept_ad": ([True, False], []),
    "mmio_log_size": ([0, 1, 10, 10_000], [-1]),
    "kvm_deviations": ([False, True], []),
}


def vm_kwargs(pk: Picker, host: kvmmu.Host) -> dict[str, object]:
    kw: dict[str, object] = {"host": host}
    kw["mmu"] = pk(["shadow", "ept", "npt"], "mmu", ["vmx"])
    kw["mmio_caching"] = pk(["off", "zap", "generation"], "mmio_caching", ["on"])
    for name, (valid, bad) in VM_OPTIONS.items():
        if pk.some(4):
            kw[name] = pk(valid, name, bad)
    if pk.some(16):
        kw["host"] = pk([None, host], "host")
    return kw


def describe(vm: kvmmu.VM) -> str:
    """How a VM was built, as the steps name it (the arguments that matter for replaying them)."""
    return (f"kvmmu.VM({vm.flavour!r}, {vm.mmio_caching!r}, address_spaces={vm.memslots.nr_as}, "
            f"initial_generation={vm.memslots.generation(0)}, guest_maxphyaddr={vm.guest_maxphyaddr}, "
            f"guest_gbpages={vm.guest_gbpages}, max_mmu_pages={vm.mmu.n_max_mmu_pages}, "
            f"mmio_gen_layout={vm.mmu.masks.gen!r}, tdp_level={vm.tdp_level}, "
            f"host_hugepage_level={vm.host_hugepage_level}, ept_ad={bool(vm.mmu.masks.accessed)}, "
            f"kvm_deviations={vm.kvm_deviations}, host=host)  # slots (id, gfn, pages): "
            f"{[(s.id, s.base_gfn, s.npages) for s in vm.memslots.all_slots()]}")


def make_world(data: st.DataObject) -> World:
    pk = Picker(data, data.draw(st.sampled_from([0, 0, 10, 30]), label="construction badness %"))
    try:
        host = kvmmu.Host(**host_kwargs(pk))  # type: ignore[arg-type]
    except kvmmu.KvmmuError as err:
        check_message(err)
        host = kvmmu.Host()
    vms = []
    for _ in range(data.draw(st.integers(1, 2), label="VMs")):
        try:
            vm = kvmmu.VM(**vm_kwargs(pk, host))  # type: ignore[arg-type]
        except kvmmu.KvmmuError as err:
            check_message(err)
            vm = kvmmu.VM(data.draw(st.sampled_from(["shadow", "ept", "npt"]), label="fallback mmu"), host=host)
        ctx = VmCtx(f"vm{len(vms)}", vm)
        if not pk.some(4):
            # Most worlds start with RAM at [0, 4 MiB) so that tables and accesses get somewhere.
            vm.set_user_memory_region(0, 0, 4 << 20)
        vms.append(ctx)
    world = World(host, vms, [f"host = kvmmu.Host({host.maxphyaddr}, memory_limit={host.memory_limit}, "
                              f"reserved={host.reserved})"])
    world.steps += [f"{c.name} = {describe(c.vm)}" for c in vms]
    return world


# -- checks -----------------------------------------------------------------------------------------------
def check_message(err: kvmmu.KvmmuError) -> None:
    """A refusal names the parameter, shows the bad value and states a rule."""
    assert not isinstance(err, (kvmmu.KvmBug, kvmmu.AuditError)), f"the model broke: {err!r}"
    if isinstance(err, kvmmu.InvalidArgument):
        msg = str(err)
        assert err.what and err.what in msg, f"the message does not name the parameter: {msg}"
        value = shown(err.what, err.value)
        assert value in msg, f"the message does not show the value {value}: {msg}"
        assert err.rule and err.rule in msg, f"the message states no rule: {msg}"


def snapshot(world: World, count_exits: bool = True) -> list[object]:
    """Everything a refused call must leave alone: each VM's deep state and every byte of host memory
    (guest RAM and KVM's tables alike).  `count_exits=False` leaves out the vCPUs' exit counters."""
    host = world.host
    mem = hashlib.sha1()
    for pfn in sorted(host.mem.pages):
        mem.update(pfn.to_bytes(8, "little"))
        mem.update(host.mem.pages[pfn])
    out: list[object] = [mem.hexdigest(), host.kernel_pages_in_use, tuple(host.resident), frozenset(host.swapped)]
    for ctx in world.vms:
        vm = ctx.vm
        state = vm_state(vm, guest_memory=False)
        if not count_exits:
            for v in state["vcpus"]:  # type: ignore[attr-defined]
                v["stats"].pop("exits")
        out.append(state)
        out.append((vm.mmio_handler, tuple(vm.iobus.ranges), len(vm.coalesced_ring), len(vm.vcpus),
                    vm.trace.enabled, vm.trace.events.maxlen, tuple(vm.trace.subscribers),
                    tuple(v.mmu_is_nested for v in vm.vcpus), tuple(v.mmu for v in vm.vcpus),
                    tuple(v.guest_mmu for v in vm.vcpus)))
    return out


def _diff(b: object, a: object, path: str) -> list[str]:
    """Where two snapshots differ, down to the changed leaves."""
    if b == a:
        return []
    if isinstance(b, dict) and isinstance(a, dict):
        return [d for k in b.keys() | a.keys() for d in _diff(b.get(k), a.get(k), f"{path}.{k}")]
    if isinstance(b, list) and isinstance(a, list) and len(b) == len(a):
        return [d for i, (x, y) in enumerate(zip(b, a, strict=True)) for d in _diff(x, y, f"{path}[{i}]")]
    return [f"{path}: {str(b)[:200]} -> {str(a)[:200]}"]


def assert_same(before: list[object], after: list[object], what: str) -> None:
    changes = _diff(before, after, "")
    assert not changes, f"the refused {what} changed " + "; ".join(changes[:8])


# -- the steps ---------------------------------------------------------------------------------------------
# A step draws its arguments and returns (description, call, what a refusal must leave unchanged:
# True everything, "exits" all but the vCPUs' exit counters, False nothing is compared).
Step = tuple[str, Callable[[], object], bool | str]


def _vm(world: World, pk: Picker) -> VmCtx:
    return pk.draw(st.sampled_from(world.vms), label="vm") if len(world.vms) > 1 else world.vms[0]


def _vcpu(ctx: VmCtx, pk: Picker) -> kvmmu.Vcpu | None:
    return pk.draw(st.sampled_from(ctx.vcpus), label="vcpu") if ctx.vcpus else None


def step_memslot(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)
    vm = ctx.vm
    slot = pk([0, 0, 1, 2, 3, 5, 0x10000, 0x10001], "slot", [0x20000, 32764, 0xFFFF, 1 << 32])
    gpa = pk(GPAS, "guest_phys_addr", BAD_GPAS)
    size = pk(SIZES, "memory_size", BAD_SIZES)
    flags = pk([0, 0, kvmmu.KVM_MEM_LOG_DIRTY_PAGES, kvmmu.KVM_MEM_READONLY, 3], "flags", [4, 1 << 16])
    kw: dict[str, object] = {"flags": flags}
    if pk.some(6):
        existing = [s.userspace_addr for s in vm.memslots.all_slots()]
        kw["userspace_addr"] = pk(existing or [None], "userspace_addr", [0, 0x1000, 1 << 63, 0x123])
    elif pk.some(5):
        def racing_vcpu() -> None:
            # What a vCPU running while the ioctl publishes the new slots does (a guest-caused result).
            for v in ctx.vcpus[:1]:
                write = pk.draw(st.booleans(), label="racing write")
                v.access(pk.draw(st.sampled_from([0, 0x1000, 0x20_0000, 0x40_0000]), label="racing gva"), 4,
                         "write" if write else "read", 7 if write else None)

        def boom() -> None:
            raise HandlerBoom("during_update")
        kw["during_update"] = pk([None, racing_vcpu], "during_update", ["not callable", boom])
    desc = f"{ctx.name}.set_user_memory_region({slot!r}, {gpa!r}, {size!r}, **{kw!r})"
    return desc, lambda: vm.set_user_memory_region(slot, gpa, size, **kw), True  # type: ignore[arg-type]


def step_phys(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)
    vm = ctx.vm
    gpa = pk(GPAS + [0x40_0000 - 4, 0x3F_FFF8, 0xFFF], "gpa", BAD_GPAS)
    if pk.some(2):
        payload = pk([b"", b"\xAA" * 8, bytes(range(256)) * 17, bytearray(b"\x01\x02"), memoryview(b"\x11" * 16)],
                     "data", ["str", [1, 2]])
        return f"{ctx.name}.write_phys({gpa!r}, {payload!r:.40})", lambda: vm.write_phys(gpa, payload), True  # type: ignore
    length = pk([0, 1, 8, 0x1000, 0x1001, 0x3000], "length")
    return f"{ctx.name}.read_phys({gpa!r}, {length!r})", lambda: vm.read_phys(gpa, length), True  # type: ignore


def step_dirty_log(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)
    vm = ctx.vm
    slot = pk([0, 1, 2, 0x10000], "slot", [0x20000, 1 << 40, 0xFFFF])
    return f"{ctx.name}.get_dirty_log({slot!r})", lambda: vm.get_dirty_log(slot), True  # type: ignore[arg-type]


def step_iobus(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)
    vm = ctx.vm
    addr = pk([0xD000_0000, 0xD000_0004, 0xFEE0_0000, 0x40_0000, 0x50_0000, 0], "addr", [U64 - 3, 1 << 63])
    length = pk([0, 1, 4, 8, 0x1000, 0x10_0000], "length", [1 << 63])
    if pk.some(2):
        return (f"{ctx.name}.register_coalesced_mmio({addr!r}, {length!r})",
                lambda: vm.register_coalesced_mmio(addr, length), True)  # type: ignore[arg-type]
    dev = pk(DEVICES, "device", BAD_DEVICES)
    return (f"{ctx.name}.register_io_device({addr!r}, {length!r}, {dev!r})",
            lambda: vm.register_io_device(addr, length, dev), True)  # type: ignore[arg-type]


def step_handler(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)
    vm = ctx.vm
    handler = pk(HANDLERS, "mmio_handler", BAD_HANDLERS)

    def set_handler() -> None:
        vm.mmio_handler = handler  # type: ignore[assignment]
    return f"{ctx.name}.mmio_handler = {getattr(handler, '__qualname__', handler)!r}", set_handler, True


def step_create_vcpu(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)

    def create() -> None:
        if len(ctx.vcpus) < 4:
            ctx.vcpus.append(ctx.vm.create_vcpu())
    return f"{ctx.name}.create_vcpu()", create, True


def step_tables(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)
    mode = pk(MODES, "mode", ["6level", "ept"])
    pool = pk([POOLS.get(mode, 0x10_0000) if isinstance(mode, str) else 0], "pool", [0x123, 0x3F_F000, 1 << 40])
    pool_end = pk([None], "pool_end", [pool if isinstance(pool, int) else 0, 0])
    # The VMM writes the tables through its mapping, or the guest does (stores at gva == gpa, which
    # shadow paging must see); a store that faults is the builder's InvalidArgument.
    by_guest = bool(ctx.vcpus) and pk.some(4)
    writer = vcpu_writer(ctx.vcpus[0]) if by_guest else vm_writer(ctx.vm)

    def build() -> None:
        pt = GuestPageTables(mode, *writer, pool=pool, pool_end=pool_end)  # type: ignore[arg-type]
        ctx.pts[mode] = pt  # type: ignore[index]
    how = f"vcpu_writer({ctx.name}.vcpu0)" if by_guest else f"vm_writer({ctx.name})"
    return (f"{ctx.name}.pts[{mode!r}] = GuestPageTables({mode!r}, *{how}, pool={pool!r}, pool_end={pool_end!r})",
            build, True)


def step_map(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)
    if not ctx.pts:
        return step_tables(world, pk)
    mode = pk.draw(st.sampled_from(sorted(ctx.pts)), label="tables")
    pt = ctx.pts[mode]
    gva = pk(MAP_GVAS, "gva", [0x40_0FFC, 1 << 32, 0x8000_0000_0000_0000, U64])
    # Gpas above 2^46: beyond the host's MAXPHYADDR, 4-level TDP and the MMIO spte's gfn (issue 15 F1-F4).
    gpa = pk([0x20_0000, 0x20_1000, 0x30_0000, 0xD000_0000, 0xFEE0_0000, 0x200_0000, 0, 1 << 32, 1 << 47, 1 << 48,
              (1 << 51) | 0x20_0000], "gpa",
             [1 << 51, 1 << 52, 1 << 60, 0x20_0800])
    page_size = pk([4096, 4096, 4096, 2 << 20, 4 << 20, 1 << 30], "page_size", [8192, 0])
    flags = pk([None, None, P | RW | US, P, P | RW | PS, P | RW | US | NX, 0, EPT_RWX | EPT_WB, EPT_RWX, 1 << 40],
               "flags", [U64, 1 << 64])
    if pk.some(5):
        length = pk([0, 0x1000, 0x3000], "length", [0x1001])
        return (f"{ctx.name}.pts[{mode!r}].map_range({gva!r}, {gpa!r}, {length!r}, {flags!r}, {page_size!r})",
                lambda: pt.map_range(gva, gpa, length, flags, page_size), False)  # type: ignore[arg-type]
    kw: dict[str, object] = {}
    if pk.some(4):
        kw["upper"] = pk([None, P | RW | US, P, EPT_RWX], "upper", [1 << 64])
    if pk.some(4):
        kw["pkey"] = pk([0, 1, 15], "pkey", [16])
    # The builder writes tables on its way down before it may run out of pool: only its argument
    # checks are atomic, so its refusals are not compared (the model's own calls are).
    return (f"{ctx.name}.pts[{mode!r}].map({gva!r}, {gpa!r}, {page_size!r}, {flags!r}, **{kw!r})",
            lambda: pt.map(gva, gpa, page_size, flags, **kw), False)  # type: ignore[arg-type]


def step_sregs(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)
    vcpu = _vcpu(ctx, pk)
    if vcpu is None:
        return step_create_vcpu(world, pk)
    cr0, cr4, efer, tables = pk.draw(st.sampled_from(REG_MODES), label="mode")
    cr3 = ctx.pts[tables].cr3 if tables in ctx.pts else pk.draw(st.sampled_from([0, 0x10_0000, 0x3F_F000]))
    kw: dict[str, object] = {}
    for name, value in (("cr0", cr0), ("cr3", cr3), ("cr4", cr4), ("efer", efer)):
        if not pk.some(8):
            kw[name] = pk([value], name)
    if pk.some(3):
        kw["cpl"] = pk([0, 3, 1, 2], "cpl", [4])
    if pk.some(4):
        kw["rflags"] = pk([2, 2 | X86_EFLAGS_AC, U64], "rflags")
    if pk.some(4):
        kw["pkru"] = pk([0, 0xC, 0xFFFF_FFFF], "pkru", [1 << 32])
    return f"{ctx.name}.vcpu{vcpu.id}.set_sregs(**{kw!r})", lambda: vcpu.set_sregs(**kw), True  # type: ignore[arg-type]


def step_write_cr(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)
    vcpu = _vcpu(ctx, pk)
    if vcpu is None:
        return step_create_vcpu(world, pk)
    which = pk.draw(st.sampled_from(["cr0", "cr3", "cr4", "efer", "invlpg"]), label="register")
    # exit=False: the instruction was emulated by KVM (no exit of its own); any value is a truth value.
    exit_ = pk([True, True, False], "exit")
    if which == "invlpg":
        gva = pk(GVAS, "gva")
        return (f"{ctx.name}.vcpu{vcpu.id}.invlpg({gva!r}, exit={exit_!r})",
                lambda: vcpu.invlpg(gva, exit=exit_), True)  # type: ignore[arg-type]
    if which == "cr3":
        value = pk([pt.cr3 for pt in ctx.pts.values()] + [0, 0x3F_F000, 0x10_0018], "cr3", [1 << 52])
        flush = pk([True, False], "flush")
        return (f"{ctx.name}.vcpu{vcpu.id}.write_cr3({value!r}, {flush!r}, exit={exit_!r})",
                lambda: vcpu.write_cr3(value, flush, exit=exit_), True)  # type: ignore[arg-type]
    value = pk(st.sampled_from(CR_BITS).map(lambda bit, w=which: getattr(vcpu, w) ^ bit), which)
    fn = getattr(vcpu, f"write_{which}")
    return f"{ctx.name}.vcpu{vcpu.id}.write_{which}({value!r}, exit={exit_!r})", lambda: fn(value, exit=exit_), True


def _access_args(pk: Picker) -> tuple:
    gva = pk(GVAS, "gva")
    size = pk([1, 2, 4, 8, 16], "size", [0, 3, 32])
    kind = pk(["read", "read", "write", "write", "fetch"], "kind", ["exec", "READ"])
    if kind == "write" and size in (1, 2, 4, 8, 16):
        value = pk(st.one_of(st.integers(0, (1 << (8 * size)) - 1), st.binary(min_size=size, max_size=size)),
                   "value", [None, 1 << 128, -1, b"\x00" * 7])
    else:
        value = pk([None], "value", [0, b""])
    cpl = pk([None, None, 0, 3, 1, 2], "cpl", [4, -1])
    implicit = pk([False, False, True], "implicit")
    return gva, size, kind, value, cpl, implicit


# What a guest access may refuse: its own arguments (the caller's mistake) and a VMM callback's bad
# reply.  An InvalidArgument naming anything else (a gpa, page tables, an address the guest's tables
# produced) is the model failing to finish a guest operation with a fault, an exit or a value.
ACCESS_ARGUMENTS = frozenset({"gva", "size", "kind", "value", "cpl", "implicit", "ops", "op", "values", "start",
                              "stop", "mmio_handler reply", "io device reply"})


def guest_operation(call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        try:
            return call()
        except kvmmu.InvalidArgument as err:
            if err.what in ACCESS_ARGUMENTS:
                raise
            raise AssertionError(f"a guest operation ended in {err!r} instead of a fault, an exit or a value") from err
    return run


def step_access(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)
    vcpu = _vcpu(ctx, pk)
    if vcpu is None:
        return step_create_vcpu(world, pk)
    args = _access_args(pk)
    return f"{ctx.name}.vcpu{vcpu.id}.access{args!r}", guest_operation(lambda: vcpu.access(*args)), True


def step_run_accesses(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)
    vcpu = _vcpu(ctx, pk)
    if vcpu is None:
        return step_create_vcpu(world, pk)
    ops: list[object] = []
    for _ in range(pk.draw(st.integers(0, 4), label="ops")):
        ops.append(_access_args(pk)[:pk.draw(st.sampled_from([3, 4, 5, 6]), label="op length")])
    if pk.some(8):
        ops.append(pk([(0x40_0000, 4, "read")], "op", [(0x40_0000,), (0x40_0000, 4, "read", None, 0, False, 1), "op"]))
    values = pk.draw(st.sampled_from([None, [], [], True]), label="values")
    start = pk.draw(st.sampled_from([0, 0, 1, 5, -5, "0", 0.5]), label="start")
    stop = pk.draw(st.sampled_from([None, None, 0, 2, 100, -1, (1,)]), label="stop")
    return (f"{ctx.name}.vcpu{vcpu.id}.run_accesses({ops!r}, {values!r}, {start!r}, {stop!r})",
            guest_operation(lambda: vcpu.run_accesses(ops, values, start, stop)), True)  # type: ignore[arg-type]


def step_nested(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)
    vcpu = _vcpu(ctx, pk)
    if vcpu is None:
        return step_create_vcpu(world, pk)
    if vcpu.mmu_is_nested and pk.some(2) or pk.some(8):
        return f"{ctx.name}.vcpu{vcpu.id}.leave_guest_mode()", vcpu.leave_guest_mode, True
    level = ctx.vm.tdp_level
    eptps = [pt.eptp(ad=bool(pk.some(2))) for m, pt in ctx.pts.items() if m.startswith("ept")]
    eptp = pk(eptps or [0x18_001E if level == 4 else 0x1A_0026], "eptp", [0x18_0000, 1 << 52 | 0x1E, 0x18_009E])
    cr0, cr4, efer, tables = pk.draw(st.sampled_from(REG_MODES), label="L2 mode")
    cr3 = ctx.pts[tables].cr3 if tables in ctx.pts else 0x10_0000
    kw = {name: pk([v], name) for name, v in (("cr0", cr0), ("cr3", cr3), ("cr4", cr4), ("efer", efer))}
    return (f"{ctx.name}.vcpu{vcpu.id}.enter_guest_mode({eptp!r}, **{kw!r})",
            lambda: vcpu.enter_guest_mode(eptp, **kw), True)  # type: ignore[arg-type]


def step_report(world: World, pk: Picker) -> Step:
    ctx = _vm(world, pk)
    vm = ctx.vm
    if pk.some(2):
        capacity = pk([None, 0, 10, 1000], "capacity", [-1, 1 << 64])
        return f"{ctx.name}.trace.enable({capacity!r})", lambda: vm.trace.enable(capacity), True  # type: ignore
    if pk.some(3):
        fn = pk([lambda ev: None, lambda ev: ev.format()], "subscriber", ["print", 5])
        return f"{ctx.name}.trace.subscribe({fn!r})", lambda: vm.trace.subscribe(fn), True  # type: ignore

    def report() -> None:
        before = vm.snapshot()
        dict(vm.stats)
        for v in vm.vcpus:
            dict(v.stats)
            dict(v.counters)
        vm.delta(before, vm.snapshot())
    return f"{ctx.name}.snapshot(), .stats, .delta()", report, False


STEPS_BY_WEIGHT: list[Callable[[World, Picker], Step]] = (
    [step_memslot] * 4 + [step_phys] * 2 + [step_dirty_log, step_iobus, step_handler, step_create_vcpu]
    + [step_tables] * 2 + [step_map] * 6 + [step_sregs] * 4 + [step_write_cr] * 3 + [step_access] * 12
    + [step_run_accesses] * 2 + [step_nested] * 2 + [step_report])


def run_step(world: World, desc: str, call: Callable[[], object], atomic: bool | str) -> None:
    """One call: it returns, or raises a kvmmu error that names its value and rule (and, for an
    `atomic` call, changed nothing); a VMM callback's own exception may propagate.  Then audit."""
    world.steps.append(desc)
    count_exits = atomic != "exits"
    before = snapshot(world, count_exits) if atomic else None
    try:
        call()
    except HandlerBoom:
        pass                      # the VMM's own callback raised: its exception is its business
    except kvmmu.HostOutOfMemory as err:
        check_message(err)        # the host ran out of memory mid-access: nothing to compare
    except kvmmu.KvmmuError as err:
        check_message(err)
        what = getattr(err, "what", None)
        # A VMM callback's bad reply is found mid-access, like its own exception: nothing to compare.
        if before is not None and what not in ("mmio_handler reply", "io device reply"):
            assert_same(before, snapshot(world, count_exits), f"{desc} ({type(err).__name__}: {err})")
    for ctx in world.vms:
        ctx.vm.audit()
        # Between calls no memslot update is in flight, even one whose during_update callback raised.
        ms = ctx.vm.memslots
        assert not any(ms.generation(i) >> 63 for i in range(ms.nr_as)), f"{desc} left a memslot update in flight"


@PROFILE
@given(st.data())
def test_api_chaos(data: st.DataObject) -> None:
    """Random public calls with valid and hostile arguments on one or two VMs sharing a host never
    crash the model, refuse with a typed error that changes nothing, and keep vm.audit() clean."""
    try:
        world = make_world(data)
    except Exception as err:
        if COLLECT:
            _collect(err, World(kvmmu.Host(), [], ["make_world"]))
            return
        raise
    for _ in range(STEPS):
        # Percent of bad arguments in this step: most steps are all valid, to get somewhere.
        pk = Picker(data, data.draw(st.sampled_from([0, 0, 0, 0, 0, 10, 10, 10, 40, 40]), label="badness %"))
        step = pk.draw(st.sampled_from(STEPS_BY_WEIGHT), label="step")
        desc, call, atomic = step(world, pk)
        try:
            run_step(world, desc, call, atomic)
        except Exception as err:
            if COLLECT:
                _collect(err, world)
                return
            err.add_note("steps so far:\n  " + "\n  ".join(world.steps[-12:]))
            raise


# -- bugs the chaos test found in files other changes owned: their minimal reproducers, now fixed ---------
@pytest.mark.parametrize("maxphyaddr", ["46", 46.0, None])
def test_host_maxphyaddr_of_wrong_type_is_refused(maxphyaddr: object) -> None:
    with pytest.raises(kvmmu.InvalidArgument):
        kvmmu.Host(maxphyaddr=maxphyaddr)  # type: ignore[arg-type]


@pytest.mark.parametrize("pfns", [5, ["x"], [1.5]], ids=["int", "str-pfn", "float-pfn"])
def test_host_swap_out_pages_bad_pfns_are_refused(pfns: object) -> None:
    host = kvmmu.Host()
    kvmmu.VM(host=host).set_user_memory_region(0, 0, 4 << 20)
    with pytest.raises(kvmmu.InvalidArgument):
        host.swap_out_pages(pfns)  # type: ignore[arg-type]


@pytest.mark.parametrize("l1_ept,tdp_level", [("ept5", 4), ("ept4", 5)])
def test_nested_ept_of_another_depth_runs(l1_ept: str, tdp_level: int) -> None:
    vm = kvmmu.VM("ept", tdp_level=tdp_level)
    vm.set_user_memory_region(0, 0, 4 << 20)
    vm.write_phys(0x1000, b"\x5a")
    vcpu = vm.create_vcpu()
    ept = GuestPageTables(l1_ept, *vm_writer(vm), pool=0x1A_0000)
    ept.map_range(0, 0, 0x2000)                       # L2 [0, 8 KiB) -> L1 [0, 8 KiB), RWX, WB
    vcpu.enter_guest_mode(ept.eptp(), cr0=X86_CR0_PE, cr3=0, cr4=0, efer=0)   # L2 with paging off
    assert vcpu.access(0x1000, 1, "read").value == 0x5A


def test_access_beyond_32_bits_is_refused_before_anything_happens() -> None:
    vm = kvmmu.VM()
    vm.set_user_memory_region(0, 0, 4 << 20)
    vcpu = vm.create_vcpu()                  # paging off; KVM_REQ_TLB_FLUSH_GUEST pending, no root yet
    before = vm_state(vm)
    with pytest.raises(kvmmu.InvalidArgument):
        vcpu.access(1 << 32, 4, "read")
    assert_unchanged(before, vm_state(vm), "access(1 << 32) with paging off")


def test_refused_cr3_write_counts_no_exit() -> None:
    vm = kvmmu.VM("shadow")
    vm.set_user_memory_region(0, 0, 4 << 20)
    vm.write_phys(0x10_1000, (0x10_2000 | 1 | (1 << 7)).to_bytes(8, "little"))   # P and bit 7: reserved in a PDPTE
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=PG, cr3=0x10_0000, cr4=X86_CR4_PAE, efer=EFER_NX)
    before = vm_state(vm)
    with pytest.raises(kvmmu.InvalidArgument):
        vcpu.write_cr3(0x10_1000)
    assert_unchanged(before, vm_state(vm), "write_cr3 to a PDPT with a reserved bit")


@pytest.mark.parametrize("kw", [dict(start="0"), dict(start=-5), dict(start=0.5), dict(stop=(1,)), dict(values=True)],
                         ids=["start-str", "start-negative", "start-float", "stop-tuple", "values-bool"])
def test_run_accesses_bad_window_is_refused(kw: dict) -> None:
    vm, vcpu, _pt = running_vm("shadow")
    with pytest.raises(kvmmu.InvalidArgument):
        vcpu.run_accesses([(0x40_0000 - 0x4000, 4, "read"), (0x40_0000 - 0x3000, 4, "read")], **kw)


# Hunting mode (KVMMU_CHAOS_COLLECT=file): record each failure's signature and steps and go on, so
# that one long run finds every distinct crash instead of stopping (and shrinking) at the first.
COLLECT = os.environ.get("KVMMU_CHAOS_COLLECT")


def _collect(err: Exception, world: World) -> None:
    import json
    import traceback
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/kvmmu/" in f.filename] or \
        traceback.extract_tb(err.__traceback__)
    where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
    with open(COLLECT, "a") as f:                  # type: ignore[arg-type]
        f.write(json.dumps({"sig": f"{type(err).__name__} at {where}", "msg": str(err)[:400],
                            "steps": world.steps}) + "\n")


# -- model bugs the chaos test found, fixed: regression tests ---------------------------------------------------
@pytest.mark.parametrize("mmu", ["shadow", "ept", "npt"])
@pytest.mark.parametrize("cr4,kind", [(X86_CR4_SMAP, "read"), (X86_CR4_SMEP, "fetch"), (X86_CR4_PKE, "read")])
def test_smep_smap_pke_do_nothing_with_paging_off(mmu: str, cr4: int, kind: str) -> None:
    """SDM 4.6: with CR0.PG=0 there is no protection by SMEP, SMAP or protection keys.  Under shadow
    paging the CPU used the guest's CR4 for KVM's direct map (whose sptes are user pages), so a
    supervisor read with CR4.SMAP (or a fetch with SMEP) faulted forever: KvmBug("faulted 64 times
    without progress").  KVM's vmx_set_cr4 clears them in hardware CR4 while the guest's paging is off."""
    vm = kvmmu.VM(mmu=mmu)
    vm.set_user_memory_region(0, 0, 4 << 20)
    vm.write_phys(0x1000, b"\x5a")
    vcpu = vm.create_vcpu()
    vcpu.write_cr4(cr4)
    r = vcpu.access(0x1000, 1, kind, cpl=0)
    assert r.fault is None and r.value == 0x5A
    vm.audit()


def test_memslot_update_completes_when_during_update_raises() -> None:
    """A vCPU racing with KVM_SET_USER_MEMORY_REGION cannot abort it: the update (generation, dirty-log
    write protection) completes, then the callback's exception is passed on.  Before, the generation
    kept its update-in-progress flag and enabling dirty logging skipped write-protecting the slot."""
    vm, vcpu, _pt = running_vm("shadow")

    def boom() -> None:
        raise HandlerBoom("racing vCPU")
    gen = vm.memslots.generation(0)
    with pytest.raises(HandlerBoom):
        vm.set_user_memory_region(0, 0, 4 << 20, flags=kvmmu.KVM_MEM_LOG_DIRTY_PAGES, during_update=boom)
    assert vm.memslots.generation(0) == gen + 2
    assert vcpu.access(0x40_0000 - 0x4000, 8, "write", 5).ok
    assert vm.get_dirty_log(0) == {0x20_0000 >> 12}       # the write was seen: the slot was write-protected
    vm.audit()


def _pt(vm: kvmmu.VM, mode: str = "4level") -> GuestPageTables:
    return GuestPageTables(mode, *vm_writer(vm), pool=0x30_0000, pool_end=0x38_0000)


# (id, call on (vm, vcpu), parameter named, value): each was a TypeError / IndexError / ValueError /
# OverflowError / AttributeError, or a refusal that had already changed something, before.
FOUND = [
    ("dirty-log-as-beyond", lambda vm, v: vm.get_dirty_log(1 << 17), "slot", 1 << 17),
    ("coalesced-str", lambda vm, v: vm.register_coalesced_mmio(b"", 0), "io device range", b""),
    ("io-device-no-write", lambda vm, v: vm.register_io_device(0xD000_0000, 8, NoWrite()), "io device", None),
    ("handler-not-callable", lambda vm, v: setattr(vm, "mmio_handler", 5), "mmio_handler", 5),
    ("run-accesses-bad-op", lambda vm, v: v.run_accesses([(0x3F_C000, 4, "read"), 5]), "op", 5),
    ("run-accesses-later-bad-size", lambda vm, v: v.run_accesses([(0x3F_C000, 4, "write", 1), (0x3F_C000, 3, "read")]),
     "size", 3),
    ("nested-eptp-float", lambda vm, v: v.enter_guest_mode(0.5, cr0=0, cr3=0, cr4=0, efer=0), "eptp", 0.5),
    ("nested-eptp-reserved", lambda vm, v: v.enter_guest_mode(1 << 52 | 0x1E, cr0=0, cr3=0, cr4=0, efer=0), "eptp",
     1 << 52 | 0x1E),
    ("nested-bad-l2-cr4", lambda vm, v: v.enter_guest_mode(0x30_001E, cr0=0, cr3=0, cr4=b"", efer=0), "cr4", b""),
    ("tables-mode-unhashable", lambda vm, v: GuestPageTables({}, *vm_writer(vm), pool=0), "mode", {}),  # type: ignore
    ("tables-pool-str", lambda vm, v: GuestPageTables("pae", *vm_writer(vm), pool="0x1000"), "pool", "0x1000"),
    ("map-gpa-str", lambda vm, v: _pt(vm).map(0x40_0000, ""), "gpa", ""),
    ("map-page-size-unhashable", lambda vm, v: _pt(vm).map(0, 0, {}), "page_size", {}),  # type: ignore
    ("map-flags-too-wide-for-32bit", lambda vm, v: _pt(vm, "32bit").map(0, 0, flags=1 << 63), "flags", 1 << 63),
    ("map-gva-misaligned", lambda vm, v: _pt(vm).map(0x40_0800, 0x20_0000), "gva", 0x40_0800),
    ("map-1g-in-pae", lambda vm, v: _pt(vm, "pae").map(0, 0, 1 << 30), "page_size", 1 << 30),
    ("map-range-step-zero", lambda vm, v: _pt(vm).map_range(0x40_0000, 0x20_0000, 0x3000, None, 0), "page_size", 0),
    ("map-range-length-bytes", lambda vm, v: _pt(vm).map_range(0, 0, b""), "length", b""),  # type: ignore
    ("trace-capacity-negative", lambda vm, v: vm.trace.enable(-1), "trace capacity", -1),
]


@pytest.mark.parametrize("case", FOUND, ids=[c[0] for c in FOUND])
def test_chaos_findings_are_refused_and_change_nothing(case: tuple) -> None:
    _id, call, what, value = case
    vm, vcpu, _pt_ = running_vm("ept" if _id.startswith("nested") else "shadow")
    before = vm_state(vm)
    with pytest.raises(kvmmu.InvalidArgument) as info:
        call(vm, vcpu)
    err = info.value
    assert err.what == what and (value is None or err.value == value or err.value is value), str(err)
    check_message(err)
    assert_unchanged(before, vm_state(vm), _id)


@pytest.mark.parametrize("kw,what", [
    (dict(address_spaces=1.0), "address_spaces"), (dict(tdp_level=4.0), "tdp_level"),
    (dict(mmio_log_size=-1), "mmio_log_size"), (dict(mmio_log_size=1 << 70), "mmio_log_size"),
    (dict(mmio_gen_layout="layout"), "mmio_gen_layout"), (dict(mmio_gen_layout=0.5), "mmio_gen_layout"),
    (dict(mmio_gen_layout=MmioGenLayout(0, 20, 40, 70)), "mmio_gen_layout"),
    (dict(guest_gbpages=None), "guest_gbpages"),
    (dict(ept_ad="yes"), "ept_ad"), (dict(initial_generation=True, address_spaces=1), "initial_generation"),
])
def test_chaos_findings_vm_parameters(kw: dict, what: str) -> None:
    """VM() parameters the chaos test found unchecked (a crash later, at construction or first use)."""
    with pytest.raises(kvmmu.InvalidArgument) as info:
        kvmmu.VM(**kw)
    assert info.value.what == what
    check_message(info.value)


@pytest.mark.parametrize("reply", [1.5, "str", [1]])
def test_mmio_handler_bad_reply_is_typed(reply: object) -> None:
    """A KVM_EXIT_MMIO read answered with something that is not an int, bytes or None is the VMM's
    bug, reported as InvalidArgument at the access (like the handler's own exception); it used to
    float to all ones silently.  The VM stays sound."""
    vm, vcpu, _pt_ = running_vm("shadow")
    vm.mmio_handler = _reply(reply)
    with pytest.raises(kvmmu.InvalidArgument) as info:
        vcpu.access(0x50_0000, 4, "read")
    assert info.value.what == "mmio_handler reply"
    vm.audit()


@pytest.mark.parametrize("reply", [b"\x01\x02", 1.5])
def test_io_device_bad_reply_is_typed(reply: object) -> None:
    """Same for an in-kernel device's read() (it was a TypeError inside the emulator)."""
    vm, vcpu, _pt_ = running_vm("shadow")
    vm.register_io_device(0xD000_0000, 0x1000, Device(reply))
    with pytest.raises(kvmmu.InvalidArgument) as info:
        vcpu.access(0x50_0000, 4, "read")
    assert info.value.what == "io device reply"
    vm.audit()


def test_a_batch_with_an_address_beyond_32_bits_runs_none_of_its_ops() -> None:
    """Outside long mode a gva >= 2^32 is refused; run_accesses refuses the whole batch before its first
    op, as it does for any other bad op (found by the long chaos hunt: the first op had already run)."""
    vm = kvmmu.VM("shadow")
    vm.set_user_memory_region(0, 0, 4 << 20)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=1)                                          # protected mode, paging off
    before = vm_state(vm)
    with pytest.raises(kvmmu.InvalidArgument, match="32 bits"):
        vcpu.run_accesses([(0x1000, 4, "write", 7), (1 << 32, 4, "read")])
    after = vm_state(vm)
    assert after == before and vm.read_phys(0x1000, 4) == bytes(4)
