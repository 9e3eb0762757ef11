"""The comparison of two observations, observable by observable, and `diff_program`: one program on
the model and on /dev/kvm (re-run while host interrupts are the only plausible difference)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..guest.runtime import RT_PT_POOL, RT_PT_POOL_END, Program, build
from . import undefined_mask
from .backends import run_model, run_real
from .observation import COUNTERS, REG_NAMES, Observation


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
