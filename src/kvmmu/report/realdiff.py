"""The differential runner: the same guest bytes on the model and on the real /dev/kvm.

    kvmmu real-diff tests/realdiff/corpus            # every program of the corpus
    kvmmu real-diff tests/realdiff/corpus/mmio.py -k dword --verbose

A program (`kvmmu.guest.runtime.Program`) is laid out once (`runtime.build`) and run by both
backends with the same memslots, memory image, registers and MMIO device; after each ``hlt`` the
host applies the program's `between` actions (memslot delete / re-add / move, memory writes).
Per program the report compares:

- ``stops``     how each run ended (hlt, shutdown, internal_error, ...)
- ``mmio``      the KVM_EXIT_MMIO stream: address, length, direction, data
- ``memory``    final guest memory of every live memslot, page-table A/D bits included
- ``faults``    the runtime's fault log (vector, error code, CR2, RIP)
- ``counters``  exits, mmio_exits, pf_taken, pf_fixed, pf_emulate, pf_guest, pf_mmio_spte_created,
                insn_emulation (vCPU) and pages_4k (VM), as deltas over the whole program
- ``regs``      general registers, RIP and RFLAGS at the end

``exits`` on the real host also counts the host's own interrupts (timer ticks while the guest runs);
the real program is run again (up to ``repeats`` runs) while its ``exits`` exceeds the model's, and the
smallest count is kept (noise only adds; a long CPL0 program may still show it).
A program may document an understood difference in ``Program.expect`` ({observable: reason}); the
report still shows it as different, marked "documented".

A corpus is a folder of ``*.py`` files (or single files), each defining ``PROGRAMS`` (a list) or
``PROGRAM``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import KvmmuError, ScenarioError
from . import undefined_mask

if TYPE_CHECKING:
    from ..kvm.profiles import HostProfile
from ..guest.runtime import (
    RT_LOG,
    RT_LOG_ENTRIES,
    RT_LOG_ENTRY_SIZE,
    RT_LOG_MAX,
    RT_PT_POOL,
    RT_PT_POOL_END,
    GuestImage,
    Program,
    Slot,
    WritePhys,
    build,
)

COUNTERS = ("exits", "mmio_exits", "pf_taken", "pf_fixed", "pf_emulate", "pf_guest", "pf_mmio_spte_created",
            "insn_emulation", "pages_4k", "pages_2m")
VM_COUNTERS = frozenset({"pages_4k", "pages_2m"})
EXTRA_COUNTERS = ("insn_emulation_fail", "invlpg", "halt_exits", "mmu_pte_write", "mmu_shadow_zapped",
                  "mmu_flooded", "mmu_unsync")
_VM_EXTRA = frozenset({"mmu_pte_write", "mmu_shadow_zapped", "mmu_flooded", "mmu_unsync"})
_X86_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
              "r14", "r15")
OBSERVABLES = ("stops", "mmio", "memory", "faults", "counters", "regs")
REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
             "r14", "r15", "rip", "rflags")


@dataclass(frozen=True)
class Mmio:
    """One KVM_EXIT_MMIO as the VMM saw it (for a read, the data the device answered)."""

    addr: int
    len: int
    write: bool
    data: bytes

    def __str__(self) -> str:
        return f"{'W' if self.write else 'R'} {self.addr:#x} len={self.len} data={self.data.hex()}"


@dataclass(frozen=True)
class FaultRecord:
    vector: int
    error_code: int
    cr2: int
    rip: int

    def __str__(self) -> str:
        return f"vec={self.vector} err={self.error_code:#x} cr2={self.cr2:#x} rip={self.rip:#x}"


@dataclass
class Observation:
    """Everything one backend showed for one program."""

    backend: str
    stops: list[str] = field(default_factory=list)
    mmio: list[Mmio] = field(default_factory=list)
    memory: dict[int, bytes] = field(default_factory=dict)
    faults: list[FaultRecord] = field(default_factory=list)
    fault_count: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    extra: dict[str, int] = field(default_factory=dict)
    regs: dict[str, int] = field(default_factory=dict)
    per_run: list[dict[str, int]] = field(default_factory=list)   # counters at the end of each run
    # SDM-undefined bits (model only): gpa byte -> bits, register -> bits, instructions using them
    undefined: dict[int, int] = field(default_factory=dict)
    undefined_regs: dict[str, int] = field(default_factory=dict)
    undefined_uses: list[str] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    # Every statistic of KVM's binary stats fds that moved (VM ones prefixed "vm."); real runs only.
    stats: dict[str, int] = field(default_factory=dict)
    # The model's trace events (name, fields) when run_model(trace=True): the lab compares them.
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


# -- the MMIO device both backends use ---------------------------------------------------------------
class Device:
    """Answers MMIO reads with ``program.mmio_read(addr, len, seq)``; seq counts every exit."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.seq = 0

    def read(self, addr: int, length: int) -> int:
        value = self.program.mmio_read(addr, length, self.seq) & ((1 << (8 * length)) - 1)
        self.seq += 1
        return value

    def write(self) -> None:
        self.seq += 1


def final_slots(program: Program) -> dict[int, Slot]:
    """The memslot table after every `between` action (both backends end with this table)."""
    table = {s.slot: s for s in program.slots}
    for actions in program.between:
        for a in actions:
            if isinstance(a, Slot):
                if a.size == 0:
                    table.pop(a.slot, None)
                else:
                    table[a.slot] = a
    return table


def _decode_log(page: bytes | None) -> tuple[list[FaultRecord], int]:
    if page is None:
        return [], 0
    count = int.from_bytes(page[0:8], "little")
    out = []
    for i in range(min(count, RT_LOG_MAX)):
        off = RT_LOG_ENTRIES - RT_LOG + RT_LOG_ENTRY_SIZE * i
        words = [int.from_bytes(page[off + 8 * j:off + 8 * j + 8], "little") for j in range(4)]
        out.append(FaultRecord(*words))
    return out, count


def _capture_memory(program: Program, read: Any) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    zero = bytes(4096)
    for s in sorted(final_slots(program).values(), key=lambda s: s.gpa):
        for gpa in range(s.gpa, s.gpa + s.size, 4096):
            page = read(gpa, 4096)
            if page != zero:
                out[gpa] = page
    return out


# -- the model backend ------------------------------------------------------------------------------------
def run_model(program: Program, profile: str | HostProfile = "kvm-pvm", image: GuestImage | None = None,
              trace: bool = False) -> Observation:
    """Run ``program`` on the model under a host profile (kvmmu.kvm.profiles); ``trace`` keeps the
    model's trace events in ``Observation.events``."""
    from ..hw.x86cpu import StepLimitExceeded, UnsupportedInstruction, X86Cpu
    from ..kvm.profiles import get_profile

    prof = get_profile(profile)
    obs = Observation(f"model:{prof.name}")
    img = image or build(program)
    vm = prof.make_vm(host_hugepage_level=2 if program.host_hugepages else 1)
    if trace:
        # A subscriber, not the bounded ring: a long program's early events must not be dropped.
        vm.trace.subscribe(lambda e: obs.events.append((e.name, dict(e.fields))))
    touch = _guest_pages(program, img) if program.prefault else set()

    def add_slot(s: Slot) -> None:
        fresh = s.size and vm.memslots.slot(s.slot & 0xFFFF, s.slot >> 16) is None
        vm.set_user_memory_region(s.slot, s.gpa, s.size, s.flags)
        if fresh:
            _prefault(vm, s, touch)

    for s in program.slots:
        add_slot(s)
    for gpa, data in img.writes():
        vm.write_phys(gpa, data)
    device = Device(program)

    def handler(ex: Any) -> int | None:
        if ex.is_write:
            device.write()
            return None
        return device.read(ex.phys_addr, ex.len)

    vm.mmio_handler = handler
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=img.cr0, cr3=img.cr3, cr4=img.cr4, efer=img.efer, cpl=img.cpl, rflags=img.rflags)
    bus = prof.make_bus(vcpu)
    cpu = X86Cpu(bus, rip=img.rip, rsp=img.rsp, rflags=img.rflags, cpl=img.cpl, cr0=img.cr0, cr3=img.cr3,
                 cr4=img.cr4, efer=img.efer, gdt=img.gdt, idt=img.idt, tss=img.tss)
    bus.cpu = cpu
    v0, m0 = dict(vcpu.stats), dict(vm.stats)
    for i in range(program.runs):
        try:
            reason = cpu.run(program.max_steps)
        except StepLimitExceeded as e:
            obs.stops.append("step_limit")
            obs.error = str(e)
            break
        except UnsupportedInstruction as e:
            obs.stops.append("unsupported")
            obs.error = str(e)
            break
        obs.stops.append(reason)
        obs.per_run.append({n: (vm.stats[n] - m0.get(n, 0)) if n in VM_COUNTERS else vcpu.stats[n] - v0.get(n, 0)
                            for n in COUNTERS})
        if reason != "hlt":
            break
        if i < len(program.between):
            for action in program.between[i]:
                if isinstance(action, Slot):
                    add_slot(action)
                elif isinstance(action, WritePhys):
                    vm.write_phys(action.gpa, action.data)
    obs.mmio = [Mmio(e.phys_addr, e.len, e.is_write, bytes(e.data)) for e in vm.mmio_log]
    obs.memory = _capture_memory(program, vm.read_phys)
    obs.faults, obs.fault_count = _decode_log(obs.memory.get(RT_LOG, bytes(4096)))
    for name in COUNTERS + EXTRA_COUNTERS:
        if name in VM_COUNTERS or name in _VM_EXTRA:
            obs_value = vm.stats[name] - m0.get(name, 0)
        else:
            obs_value = vcpu.stats[name] - v0.get(name, 0)
        (obs.counters if name in COUNTERS else obs.extra)[name] = obs_value
    obs.regs = dict(zip(_X86_ORDER, cpu.regs, strict=True))
    obs.regs["rip"] = cpu.rip
    obs.regs["rflags"] = cpu.rflags
    obs.undefined, obs.undefined_regs, obs.undefined_uses = undefined_mask.collect(cpu, vcpu)
    return obs


# -- the real backend ------------------------------------------------------------------------------------
def _guest_pages(program: Program, img: GuestImage) -> set[int]:
    """The guest-physical pages the guest can reach: every page a map (in any address space) or
    the demand window points at, and every page of the image.  ``prefault`` populates these."""
    pages = {gpa for gpa in img.memory}
    for maps in (program.maps, *program.spaces):
        for m in maps:
            if m.alias is not None or not isinstance(m.gpa, int | None):
                continue
            base = m.gva if m.gpa is None else m.gpa
            pages.update(range(base, base + m.size, 4096))
    if program.demand is not None:
        d = program.demand
        pages.update(range(d.gpa, d.gpa + d.size, 4096))
    for gpa in program.data:
        pages.add(gpa & ~0xFFF)
    pages.update(range(RT_PT_POOL, RT_PT_POOL_END, 4096))
    return pages


def _prefault(vm: Any, s: Slot, touch: set[int]) -> None:
    """The VMM writes every page of a new slot that the program can reach (``Program.prefault``)."""
    for page in sorted(p for p in touch if s.gpa <= p < s.gpa + s.size):
        vm.write_phys(page, bytes(4096))


def run_real(program: Program, image: GuestImage | None = None, timeout: float = 5.0) -> Observation:
    """Run ``program`` once on the real /dev/kvm (kvmmu.real)."""
    from ..real import RealVM, flat_long_mode_sregs, stats_delta

    obs = Observation("real")
    img = image or build(program)
    device = Device(program)

    def handler(addr: int, length: int, value: int | None = None) -> int | None:
        if value is not None:
            device.write()
            return None
        return device.read(addr, length)

    touch = _guest_pages(program, img) if program.prefault else set()

    def add_slot(vm: Any, s: Slot) -> None:
        fresh = s.size and s.slot not in vm.memslots
        vm.set_user_memory_region(s.slot, s.gpa, s.size, s.flags)
        if fresh:
            _prefault(vm, s, touch)

    with RealVM(hugepages=program.host_hugepages) as vm:
        for s in program.slots:
            add_slot(vm, s)
        for gpa, data in img.writes():
            vm.write_phys(gpa, data)
        vcpu = vm.create_vcpu()
        sregs = flat_long_mode_sregs(img.gdt[0], img.idt[0], img.tss[0], img.cr3, img.cpl, img.idt[1],
                                     img.cr0, img.cr4, img.efer)
        sregs.update(cr0=img.cr0, cr4=img.cr4, efer=img.efer)
        vcpu.set_sregs(**sregs)
        regs = dict.fromkeys(REG_NAMES, 0)
        regs.update(rip=img.rip, rsp=img.rsp, rflags=img.rflags)
        vcpu.set_regs(**regs)
        v0, m0 = vcpu.stats, vm.stats
        for i in range(program.runs):
            ex = vcpu.run(mmio_handler=handler, max_exits=1_000_000, timeout=timeout)
            obs.stops.append(ex.reason if ex.reason != "intr" else "timeout")
            dv, dm = stats_delta(v0, vcpu.stats), stats_delta(m0, vm.stats)
            obs.per_run.append({n: int((dm if n in VM_COUNTERS else dv).get(n, 0)) for n in COUNTERS})
            if ex.reason == "internal_error":
                obs.notes.append(str(ex))
            if ex.reason != "hlt":
                break
            if i < len(program.between):
                for action in program.between[i]:
                    if isinstance(action, Slot):
                        add_slot(vm, action)
                    elif isinstance(action, WritePhys):
                        vm.write_phys(action.gpa, action.data)
        dv = stats_delta(v0, vcpu.stats)
        dm = stats_delta(m0, vm.stats)
        obs.mmio = [Mmio(a.phys_addr, a.len, a.is_write, bytes(a.data or b"")) for a in vcpu.mmio_log]
        obs.memory = _capture_memory(program, vm.read_phys)
        final = vcpu.get_regs()
    obs.faults, obs.fault_count = _decode_log(obs.memory.get(RT_LOG, bytes(4096)))
    obs.stats = {**{n: v for n, v in dv.items() if isinstance(v, int) and v},
                 **{f"vm.{n}": v for n, v in dm.items() if isinstance(v, int) and v}}
    for name in COUNTERS + EXTRA_COUNTERS:
        src = dm if (name in VM_COUNTERS or name in _VM_EXTRA) else dv
        value = src.get(name, 0)
        (obs.counters if name in COUNTERS else obs.extra)[name] = int(value) if isinstance(value, int) else 0
    obs.regs = {k: final[k] for k in REG_NAMES}
    return obs


# -- comparison -----------------------------------------------------------------------------------------------
@dataclass
class ObservableDiff:
    name: str
    equal: bool
    lines: list[str] = field(default_factory=list)
    documented: str | None = None


@dataclass
class ProgramReport:
    program: Program
    model: Observation
    real: Observation | None
    diffs: list[ObservableDiff] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.program.name

    @property
    def status(self) -> str:
        if self.real is None:
            return "model-only"
        if self.model.error and self.model.stops[-1:] in (["unsupported"], ["step_limit"]):
            return "error"
        bad = [d for d in self.diffs if not d.equal]
        if not bad:
            return "agree"
        if all(d.documented for d in bad):
            return "documented"
        return "differ"


def _pte_flags(v: int) -> str:
    names = [(1, "P"), (2, "RW"), (4, "US"), (0x20, "A"), (0x40, "D"), (0x80, "PS"), (1 << 63, "NX")]
    return "|".join(n for bit, n in names if v & bit) or "0"


def _diff_memory(model: dict[int, bytes], real: dict[int, bytes], limit: int = 12) -> list[str]:
    lines: list[str] = []
    zero = bytes(4096)
    pages = sorted(set(model) | set(real))
    shown = 0
    for gpa in pages:
        a, b = model.get(gpa, zero), real.get(gpa, zero)
        if a == b:
            continue
        is_pt = RT_PT_POOL <= gpa < RT_PT_POOL_END
        for off in range(0, 4096, 8):
            qa = int.from_bytes(a[off:off + 8], "little")
            qb = int.from_bytes(b[off:off + 8], "little")
            if qa == qb:
                continue
            if shown >= limit:
                lines.append("  ...")
                return lines
            extra = f"   (PTE model {_pte_flags(qa)} / real {_pte_flags(qb)})" if is_pt else ""
            lines.append(f"  gpa {gpa + off:#x}: model {qa:#018x} real {qb:#018x}{extra}")
            shown += 1
    return lines


def _diff_seq(name: str, a: Sequence[object], b: Sequence[object], limit: int = 6) -> list[str]:
    lines = [f"  model: {len(a)} {name}, real: {len(b)}"] if len(a) != len(b) else []
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x != y:
            lines.append(f"  first difference at #{i}:")
            for j in range(max(0, i - 1), min(max(len(a), len(b)), i + limit)):
                xa = str(a[j]) if j < len(a) else "-"
                yb = str(b[j]) if j < len(b) else "-"
                mark = "!" if xa != yb else " "
                lines.append(f"   {mark} #{j}: model {xa:<44} real {yb}")
            break
    return lines


def compare(program: Program, model: Observation, real: Observation) -> list[ObservableDiff]:
    """Every observable, with the bits the SDM leaves undefined (as the model tracked them: flags
    after MUL/DIV/shifts/..., and their images in memory and registers) cleared on both sides."""
    out: list[ObservableDiff] = []
    model_memory = undefined_mask.mask_memory(model.memory, model.undefined)
    real_memory = undefined_mask.mask_memory(real.memory, model.undefined)
    model_regs = undefined_mask.mask_regs(model.regs, model.undefined_regs)
    real_regs = undefined_mask.mask_regs(real.regs, model.undefined_regs)

    def add(name: str, equal: bool, lines: list[str]) -> None:
        out.append(ObservableDiff(name, equal, lines if not equal else [], program.expect.get(name)))

    add("stops", model.stops == real.stops, [f"  model {model.stops}  real {real.stops}"])
    add("mmio", model.mmio == real.mmio, _diff_seq("exits", model.mmio, real.mmio))
    add("memory", model_memory == real_memory, _diff_memory(model_memory, real_memory))
    add("faults", model.faults == real.faults and model.fault_count == real.fault_count,
        _diff_seq("faults", model.faults, real.faults)
        + ([f"  fault count model {model.fault_count} real {real.fault_count}"]
           if model.fault_count != real.fault_count else []))
    # A counter the real side did not record (an older recording) is not compared.
    bad = [n for n in COUNTERS if n in real.counters and model.counters.get(n) != real.counters[n]]
    lines = [f"  {n:<22} model {model.counters.get(n)!s:>8}  real {real.counters.get(n)!s:>8}" for n in bad]
    if bad and len(model.per_run) > 1:
        for i, (a, b) in enumerate(zip(model.per_run, real.per_run, strict=False)):
            lines.append(f"    after run {i + 1}: " + ", ".join(f"{n} {a.get(n)}/{b.get(n)}" for n in bad))
    add("counters", not bad, lines)
    badr = [n for n in REG_NAMES if model_regs.get(n) != real_regs.get(n)]
    add("regs", not badr, [f"  {n:<7} model {model_regs.get(n, 0):#x}  real {real_regs.get(n, 0):#x}" for n in badr])
    return out


def diff_program(program: Program, profile: str = "kvm-pvm", real: bool = True, repeats: int = 5) -> ProgramReport:
    """Run one program on the model and (if ``real``) on /dev/kvm, and compare."""
    image = build(program)
    model = run_model(program, profile, image)
    if not real:
        return ProgramReport(program, model, None)
    obs = run_real(program, image)
    seen = [obs.counters["exits"]]
    first = compare(program, model, obs)
    others_equal = all(d.equal for d in first if d.name not in ("counters", "regs"))
    for _ in range(max(0, repeats - 1)):
        # Host interrupts only add exits: run again while that is the only plausible difference.
        if not others_equal or obs.counters["exits"] <= model.counters["exits"]:
            break
        again = run_real(program, image)
        seen.append(again.counters["exits"])
        if again.counters["exits"] < obs.counters["exits"]:
            obs.counters["exits"] = again.counters["exits"]
    if len(seen) > 1:
        obs.notes.append(f"real exits over {len(seen)} runs: {seen} (min kept)")
    return ProgramReport(program, model, obs, compare(program, model, obs))


# -- corpus ----------------------------------------------------------------------------------------------------
def _short(value: object) -> str:
    try:
        text = repr(value)
    except Exception:                       # a corpus object whose __repr__ fails is still named
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def load_programs(paths: Iterable[str | Path]) -> list[Program]:
    """Programs from corpus files / folders (``PROGRAMS`` list or ``PROGRAM`` in each ``*.py``)."""
    out: list[Program] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ScenarioError(f"corpus path {str(path)!r} does not exist")
        files = sorted(f for f in path.glob("*.py") if not f.name.startswith("_")) if path.is_dir() else [path]
        for f in files:
            spec = importlib.util.spec_from_file_location(f"kvmmu_corpus_{f.stem}_{abs(hash(str(f)))}", f)
            if spec is None or spec.loader is None:
                raise ScenarioError(f"cannot load corpus file {str(f)!r}")
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except KvmmuError:
                raise
            except SystemExit as e:
                # A corpus file is imported, never run as a script: exiting would end kvmmu itself.
                raise ScenarioError(f"corpus file {str(f)!r} called sys.exit({e.code!r}) while loading: a corpus "
                                    "file only defines PROGRAMS or PROGRAM") from None
            except Exception as e:
                msg = str(e).replace("\n", " ")[:200]
                raise ScenarioError(f"corpus file {str(f)!r} failed to load: {type(e).__name__}: {msg}") from None
            progs = getattr(module, "PROGRAMS", None)
            if progs is None and hasattr(module, "PROGRAM"):
                progs = [module.PROGRAM]
            if progs is None:
                raise ScenarioError(f"corpus file {str(f)!r} defines neither PROGRAMS nor PROGRAM")
            if not isinstance(progs, (list, tuple)):
                raise ScenarioError(f"corpus file {str(f)!r}: PROGRAMS = {_short(progs)}: a list of "
                                    "kvmmu.guest.runtime.Program")
            for prog in progs:
                if not isinstance(prog, Program):
                    raise ScenarioError(f"{str(f)!r}: {_short(prog)} is not a kvmmu.guest.runtime.Program")
                out.append(prog)
    names = [p.name for p in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ScenarioError(f"program names must be unique; repeated: {sorted(dup)}")
    return out


# -- output ------------------------------------------------------------------------------------------------------
def format_report(reports: list[ProgramReport], verbose: bool = False) -> str:
    lines: list[str] = []
    width = max((len(r.name) for r in reports), default=10)
    header = f"{'program':<{width}}  {'status':<10}  " + "  ".join(f"{o:<8}" for o in OBSERVABLES)
    lines.append(header)
    lines.append("-" * len(header))
    for r in reports:
        cells = []
        for o in OBSERVABLES:
            d = next((x for x in r.diffs if x.name == o), None)
            cells.append(f"{'-' if d is None else 'equal' if d.equal else 'DOC' if d.documented else 'DIFF':<8}")
        lines.append(f"{r.name:<{width}}  {r.status:<10}  " + "  ".join(cells))
    counts: dict[str, int] = {}
    for r in reports:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines.append("")
    lines.append("summary: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    for r in reports:
        if r.status in ("agree", "model-only") and not verbose:
            continue
        lines.append("")
        lines.append(f"== {r.name} ({r.status}) ==")
        if r.program.doc:
            lines.append(f"  {r.program.doc}")
        if r.model.error:
            lines.append(f"  model error: {r.model.error}")
        if r.real is not None:
            lines.extend(f"  note: {n}" for n in r.real.notes)
        lines.extend(f"  uses an SDM-undefined value (results after it are the model's guess): {u}"
                     for u in r.model.undefined_uses)
        for d in r.diffs:
            if d.equal:
                continue
            tag = f" [documented: {d.documented}]" if d.documented else ""
            lines.append(f" {d.name}: different{tag}")
            lines.extend(d.lines)
        if verbose:
            lines.append("  counters        " + "  ".join(f"{n}={r.model.counters[n]}" for n in COUNTERS))
            if r.real is not None:
                lines.append("  real counters   " + "  ".join(f"{n}={r.real.counters[n]}" for n in COUNTERS))
            lines.append("  model extra     " + "  ".join(f"{n}={v}" for n, v in r.model.extra.items()))
            if r.real is not None:
                lines.append("  real extra      " + "  ".join(f"{n}={v}" for n, v in r.real.extra.items()))
    return "\n".join(lines)


def report_json(reports: list[ProgramReport]) -> str:
    def obs(o: Observation | None) -> dict[str, Any] | None:
        if o is None:
            return None
        return {"backend": o.backend, "stops": o.stops, "counters": o.counters, "extra": o.extra,
                "mmio": [str(m) for m in o.mmio], "faults": [str(f) for f in o.faults],
                "fault_count": o.fault_count, "pages": len(o.memory), "error": o.error, "notes": o.notes,
                "undefined_uses": o.undefined_uses,
                "regs": {k: hex(v) for k, v in o.regs.items()}}
    return json.dumps([{"program": r.name, "cpl": r.program.cpl, "status": r.status,
                        "diffs": {d.name: {"equal": d.equal, "documented": d.documented, "lines": d.lines}
                                  for d in r.diffs},
                        "model": obs(r.model), "real": obs(r.real)} for r in reports], indent=1)


# -- CLI --------------------------------------------------------------------------------------------------------
def _cmd(args: argparse.Namespace) -> int:
    from ..cliargs import Progress, emit
    from ..real import available, unavailable_reason

    programs = load_programs(args.paths)
    if args.k:
        programs = [p for p in programs if any(k in p.name for k in args.k)]
    if not programs:
        raise ScenarioError("no program matched")
    if getattr(args, "recorded", None):
        return _cmd_recorded(args, programs)
    use_real = not args.model_only
    if use_real and not available():
        print(f"real-diff: /dev/kvm unavailable ({unavailable_reason()}); running the model only", file=sys.stderr)
        use_real = False
    prog = Progress("real-diff", getattr(args, "quiet", False), total=len(programs), unit="program")
    reports = []
    for i, p in enumerate(programs):
        reports.append(diff_program(p, args.profile, use_real, args.repeats))
        prog((i + 1) / len(programs))
    prog.done()
    emit(args, (report_json(reports) if args.json else format_report(reports, args.verbose)) + "\n")
    return 1 if any(r.status in ("differ", "error") for r in reports) else 0


def _cmd_recorded(args: argparse.Namespace, programs: list[Program]) -> int:
    """``--recorded FILE``: the real side comes from a lab results file (kvmmu.lab), no /dev/kvm needed."""
    from ..lab.compare import diff_recorded, load_recorded_programs
    from ..lab.record import load_results

    results = load_results(args.recorded)
    programs = load_recorded_programs(args.paths, results, args.k)   # built for the recorded guest width
    profile = args.profile if args.profile_given else results.get("profile") or args.profile
    reports = diff_recorded(programs, results, profile)
    print(report_json(reports) if args.json else format_report(reports, args.verbose))
    return 1 if any(r.status in ("differ", "error") for r in reports) else 0


class _ProfileAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        namespace.profile, namespace.profile_given = values, True


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``real-diff`` on the kvmmu command line."""
    from ..cliargs import integer
    p = subparsers.add_parser("real-diff", help="run guest programs on the model and on /dev/kvm and compare",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="corpus folders or program files")
    p.add_argument("-k", action="append", default=[], help="only programs whose name contains this (repeatable)")
    p.add_argument("--profile", default="kvm-pvm", action=_ProfileAction,
                   help="model host profile (kvm-pvm, vmx-ept, vmx-shadow, svm-npt-tdp, svm-npt-legacy, svm-shadow)")
    p.add_argument("--recorded", metavar="FILE",
                   help="compare with real observations recorded by `kvmmu lab` (tests/realdiff/lab/*.json) "
                        "instead of running /dev/kvm; the profile defaults to the file's")
    p.set_defaults(profile_given=False)
    p.add_argument("--model-only", action="store_true", help="do not touch /dev/kvm")
    p.add_argument("--repeats", type=integer(1, 100, "a number of real runs"), default=5,
                   help="real runs of a program at most (1-100), while its exits exceed the model's (host noise)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true", help="details for every program")
    p.set_defaults(func=_cmd)
    return p


__all__ = ["COUNTERS", "Device", "FaultRecord", "Mmio", "Observation", "ProgramReport", "add_cli", "compare",
           "diff_program", "format_report", "load_programs", "report_json", "run_model", "run_real"]


def main(argv: list[str] | None = None) -> int:
    """``python -m kvmmu.report.realdiff PATH...`` — the same as ``kvmmu real-diff PATH...``."""
    from ..cli import main as cli_main
    return cli_main(["real-diff", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
