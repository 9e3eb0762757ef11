"""A sweep: one base scenario, a matrix of parameters and a list of seeds, expanded into cells.

    scenario = "scenarios/tiny.toml"        # or an inline [base] table with the scenario itself
    seeds = [1, 2, 3]
    metrics = ["mmio_slow_path", "exits"]   # the rows of the summary (default: the compare rows)
    [matrix]
    "vm.*.mmu" = ["shadow", "ept"]          # a dotted path into the scenario; `*` is every list item
    "vm.*.mmio_caching" = ["zap", "generation"]
    "cost.vm_exit" = [800, 1200]

Every combination of the matrix values, for every seed, is one cell.  A cell is the complete scenario
it runs (base + overrides + seed), and its key is a hash of that: a result stored under the key is the
result of exactly that scenario, whatever sweep asked for it.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ScenarioError
from ..scenario import Scenario

_SPEC_KEYS = {"scenario", "base", "seeds", "matrix", "metrics", "name"}
MAX_CELLS = 100_000


@dataclass(frozen=True)
class Cell:
    point: tuple[tuple[str, Any], ...]      # (path, value) per matrix axis, in the spec's order
    seed: int
    scenario: dict[str, Any]                # the complete scenario the cell runs

    @property
    def key(self) -> str:
        blob = json.dumps(self.scenario, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @property
    def label(self) -> str:
        return ", ".join(f"{p}={v}" for p, v in self.point) or "base"


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]
    seeds: list[int]
    matrix: list[tuple[str, list[Any]]]
    metrics: list[str] | None

    def cells(self) -> list[Cell]:
        axes = [[(path, v) for v in values] for path, values in self.matrix]
        out = []
        for point in itertools.product(*axes) if axes else [()]:
            for seed in self.seeds:
                sc = copy.deepcopy(self.base)
                for path, value in point:
                    _apply(sc, path.split("."), value, path)
                sc["seed"] = seed
                out.append(Cell(tuple(point), seed, sc))
        return out


def _apply(node: Any, parts: list[str], value: Any, path: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if head == "*":
            targets = list(range(len(node)))
        elif head.isdigit() and int(head) < len(node):
            targets = [int(head)]
        else:
            raise ScenarioError(f"matrix {path!r}: {head!r} is not an index of a list of {len(node)} (or *)")
        for i in targets:
            if rest:
                _apply(node[i], rest, value, path)
            else:
                node[i] = value
        return
    if not isinstance(node, dict):
        raise ScenarioError(f"matrix {path!r}: {head!r} is below a value, not a table")
    if rest:
        if head not in node:
            node[head] = {}
        _apply(node[head], rest, value, path)
    else:
        node[head] = value


def load_spec(path: str | Path) -> SweepSpec:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"sweep {str(p)!r}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"sweep {str(p)!r}: cannot read it ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"sweep {str(p)!r}: not valid TOML: {e}") from None
    return spec_from_dict(data, str(p), p.parent)


def spec_from_dict(data: dict[str, Any], source: str = "<sweep>", here: Path = Path(".")) -> SweepSpec:
    unknown = set(data) - _SPEC_KEYS
    if unknown:
        raise ScenarioError(f"{source}: unknown key(s) {sorted(unknown)}; a sweep has {sorted(_SPEC_KEYS)}")
    if ("scenario" in data) == ("base" in data):
        raise ScenarioError(f"{source}: give exactly one of `scenario` (a file) or `base` (an inline scenario)")
    if "scenario" in data:
        sp = Path(data["scenario"])
        sp = sp if sp.is_absolute() or sp.exists() else here / sp
        try:
            base = tomllib.loads(sp.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ScenarioError(f"{source}: scenario {data['scenario']!r}: no such file") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ScenarioError(f"{source}: scenario {data['scenario']!r}: cannot read it ({e})") from None
        base.setdefault("name", sp.stem)
    else:
        base = data["base"]
        if not isinstance(base, dict):
            raise ScenarioError(f"{source}: base = {base!r}: an inline scenario is a table")
    seeds = data.get("seeds", [base.get("seed", 1)])
    if not isinstance(seeds, list) or not seeds or any(type(s) is not int or s < 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ScenarioError(f"{source}: seeds = {seeds!r}: a list of distinct non-negative integers")
    matrix_t = data.get("matrix", {})
    if not isinstance(matrix_t, dict):
        raise ScenarioError(f"{source}: matrix = {matrix_t!r}: a table of path = [values]")
    matrix = []
    n = len(seeds)
    for path, values in matrix_t.items():
        if not isinstance(values, list) or not values:
            raise ScenarioError(f"{source}: matrix {path!r} = {values!r}: a non-empty list of values")
        if path == "seed":
            raise ScenarioError(f"{source}: matrix 'seed': seeds are given by `seeds`")
        matrix.append((path, values))
        n *= len(values)
        if n > MAX_CELLS:
            raise ScenarioError(f"{source}: the matrix has more than {MAX_CELLS:,} cells")
    metrics = data.get("metrics")
    if metrics is not None and (not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics)):
        raise ScenarioError(f"{source}: metrics = {metrics!r}: a list of counter names")
    spec = SweepSpec(str(data.get("name", base.get("name", "sweep"))), base, seeds, matrix, metrics)
    # Every matrix point must be a valid scenario before anything runs (the seed changes nothing there).
    for cell in spec.cells()[::len(seeds)]:
        try:
            Scenario.from_dict(copy.deepcopy(cell.scenario), f"{source} [{cell.label}, seed {cell.seed}]")
        except ScenarioError as e:
            raise ScenarioError(str(e)) from None
    return spec
