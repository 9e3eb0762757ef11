"""The layers of docs/ARCHITECTURE.md are the layers the imports show.

The table under "## Layers" in docs/ARCHITECTURE.md lists the layers bottom-up and the modules of
each; this test reads that table (so the map and the test cannot drift apart), parses every module
under src/kvmmu with `ast` and finds every import of a kvmmu module: at module level, inside
functions, and under `if TYPE_CHECKING`.  An import from a higher layer fails the test, and so does
an import cycle between packages (kvmmu.hw, kvmmu.kvm, kvmmu.cli, ...), whichever layers they are in.

The one allowed arrow up: a module's `python -m` entry point (a top-level `main()` in a module with
an `if __name__ == "__main__":` block) may import kvmmu.cli, since it is the command line.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
ARCH_DOC = ROOT / "docs" / "ARCHITECTURE.md"


@dataclass(frozen=True)
class Import:
    module: str          # the importing module
    imported: str        # the kvmmu module (or package) it names
    line: int
    where: str           # "module", "function", "type-checking" or "entry-point"


def read_layer_table(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """[(layer, (module prefix, ...)), ...] bottom-up, from the first table after "## Layers"."""
    section = text.split("\n## Layers", 1)
    assert len(section) == 2, "docs/ARCHITECTURE.md has no '## Layers' section"
    rows = []
    for line in section[1].splitlines()[1:]:
        if line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        rows.append((int(cells[0]), cells[1], tuple(re.findall(r"`(kvmmu(?:\.\w+)*)`", cells[2]))))
    assert rows, "the '## Layers' table of docs/ARCHITECTURE.md has no rows"
    assert [r[0] for r in rows] == list(range(len(rows))), "layer ranks are 0, 1, 2, ... bottom-up"
    return [(name, mods) for _, name, mods in rows]


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return any(isinstance(n, (ast.Name, ast.Attribute)) and getattr(n, "id", getattr(n, "attr", None))
               == "TYPE_CHECKING" for n in ast.walk(test))


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)


def imports_of(source: str, module: str, is_package: bool, modules: frozenset[str] = frozenset()) -> list[Import]:
    """Every import of a kvmmu module in `source`, relative ones resolved against `module`; `from P
    import m` names module P.m when P.m is one of `modules`."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    entry_point = any(_is_main_guard(n) for n in tree.body)
    out: list[Import] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            w = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                w = "entry-point" if (node is tree and child.name == "main" and entry_point) else \
                    ("function" if where == "module" else where)
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for b in child.body:
                    visit_stmt(b, "type-checking")
                for b in child.orelse:
                    visit_stmt(b, where)
                continue
            visit_stmt(child, w)

    def visit_stmt(child: ast.AST, where: str) -> None:
        if isinstance(child, ast.Import):
            out.extend(Import(module, a.name, child.lineno, where) for a in child.names
                       if a.name.split(".")[0] == "kvmmu")
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                base = package.split(".")
                base = base[:len(base) - (child.level - 1)]
                target = ".".join(base + ([child.module] if child.module else []))
            else:
                target = child.module or ""
            if target.split(".")[0] == "kvmmu":
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    out.append(Import(module, sub if sub in modules else target, child.lineno, where))
        visit(child, where)

    visit(tree, "module")
    return out


def all_imports(src: Path = SRC) -> list[Import]:
    paths = sorted((src / "kvmmu").rglob("*.py"))
    modules = frozenset(module_name(p, src) for p in paths)
    out = []
    for path in paths:
        out += imports_of(path.read_text(encoding="utf-8"), module_name(path, src), path.name == "__init__.py",
                          modules)
    return out


def layer_of(module: str, table: list[tuple[str, tuple[str, ...]]]) -> int | None:
    """The rank of the layer whose longest module prefix matches (`kvmmu` alone matches only itself)."""
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(table):
        for p in prefixes:
            if (module == p or (p != "kvmmu" and module.startswith(p + "."))) and len(p) > best_len:
                best, best_len = rank, len(p)
    return best


def unit_of(module: str) -> str:
    """The package a module belongs to for cycle detection: kvmmu.<first component>."""
    return ".".join(module.split(".")[:2])


def upward_imports(imports: list[Import], table: list[tuple[str, tuple[str, ...]]]) -> list[tuple[str, str]]:
    bad = []
    for imp in imports:
        if imp.where == "entry-point" and imp.imported == "kvmmu.cli":
            continue
        a, b = layer_of(imp.module, table), layer_of(imp.imported, table)
        if a is not None and b is not None and b > a:
            bad.append((imp.module, imp.imported))
    return sorted(set(bad))


def package_cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected sets of more than one package in the package import graph (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        a, b = unit_of(imp.module), unit_of(imp.imported)
        graph.setdefault(a, set())
        graph.setdefault(b, set())
        if a != b and not (imp.where == "entry-point" and imp.imported == "kvmmu.cli"):
            graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def _table() -> list[tuple[str, tuple[str, ...]]]:
    return read_layer_table(ARCH_DOC.read_text(encoding="utf-8"))


def _edges(imports: list[Import], a: str, b: str) -> list[str]:
    return sorted({f"{i.module} -> {i.imported}" for i in imports
                   if a != b and unit_of(i.module) == a and unit_of(i.imported) == b})


# -- the source tree -----------------------------------------------------------------------------
def test_every_module_has_a_layer() -> None:
    table = _table()
    modules = {module_name(p, SRC) for p in (SRC / "kvmmu").rglob("*.py")}
    assert not sorted(m for m in modules if layer_of(m, table) is None), "modules missing from the layer table"


def test_no_import_from_a_higher_layer() -> None:
    table = _table()
    bad = upward_imports(all_imports(), table)
    assert not bad, "imports from a higher layer (module, imported):\n" + "\n".join(
        f"  {a} ({table[layer_of(a, table)][0]}) -> {b} ({table[layer_of(b, table)][0]})" for a, b in bad)


def test_no_import_cycle_between_packages() -> None:
    imports = all_imports()
    cycles = package_cycles(imports)
    detail = []
    for comp in cycles:
        for a in comp:
            for b in comp:
                detail += _edges(imports, a, b)
    assert not cycles, f"import cycles between packages: {cycles}\n" + "\n".join(detail)


def test_hw_imports_nothing_from_kvm_even_for_type_checking() -> None:
    bad = [(i.module, i.imported, i.where) for i in all_imports()
           if i.module.startswith("kvmmu.hw") and not i.imported.startswith(("kvmmu.hw", "kvmmu.arch", "kvmmu.errors"))]
    assert not bad


# -- the checker itself --------------------------------------------------------------------------
_TABLE = [("base", ("kvmmu.errors",)), ("arch", ("kvmmu.arch",)), ("hw", ("kvmmu.hw",)), ("kvm", ("kvmmu.kvm",)),
          ("cli", ("kvmmu.cli",))]


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_checker_finds_an_upward_import_in_every_position(tmp_path: Path) -> None:
    src = _tree(tmp_path, {
        "kvmmu/__init__.py": "",
        "kvmmu/errors.py": "",
        "kvmmu/arch/__init__.py": "",
        "kvmmu/arch/bits.py": "from ..errors import X\nfrom .. import errors\n",             # down: fine
        "kvmmu/hw/__init__.py": "",
        "kvmmu/hw/cpu.py": "from ..kvm.vcpu import ACCESS_KINDS\n",                        # module level
        "kvmmu/hw/tdp.py": "def f():\n    from kvmmu.kvm import vm\n",                     # function-local
        "kvmmu/hw/host.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import kvmmu.kvm.vm\n",
        "kvmmu/kvm/__init__.py": "",
        "kvmmu/kvm/vm.py": "",
        "kvmmu/kvm/vcpu.py": "from ..hw import cpu\n",
        "kvmmu/kvm/run.py": "def main():\n    from ..cli import main\nif __name__ == '__main__':\n    main()\n",
        "kvmmu/kvm/other.py": "def main():\n    from ..cli import main\n",                # not an entry point
        "kvmmu/hw/memory.py": "from kvmmu import cli\n",                                 # the submodule kvmmu.cli
        "kvmmu/cli.py": "from .kvm import vm\n",
    })
    imports = all_imports(src)
    assert {(i.module, i.where) for i in imports if i.module.startswith("kvmmu.hw")} == {
        ("kvmmu.hw.cpu", "module"), ("kvmmu.hw.tdp", "function"), ("kvmmu.hw.host", "type-checking"),
        ("kvmmu.hw.memory", "module")}
    assert upward_imports(imports, _TABLE) == [
        ("kvmmu.hw.cpu", "kvmmu.kvm.vcpu"), ("kvmmu.hw.host", "kvmmu.kvm.vm"), ("kvmmu.hw.memory", "kvmmu.cli"),
        ("kvmmu.hw.tdp", "kvmmu.kvm.vm"), ("kvmmu.kvm.other", "kvmmu.cli")]
    assert package_cycles(imports) == [["kvmmu.cli", "kvmmu.hw", "kvmmu.kvm"]]


def test_checker_passes_a_tree_that_points_down(tmp_path: Path) -> None:
    src = _tree(tmp_path, {
        "kvmmu/__init__.py": "from .kvm import vm\n",
        "kvmmu/errors.py": "",
        "kvmmu/hw/__init__.py": "",
        "kvmmu/hw/cpu.py": "from ..errors import X\nfrom . import memory\n",
        "kvmmu/kvm/__init__.py": "",
        "kvmmu/kvm/vm.py": "from ..hw.cpu import Cpu\nfrom . import vcpu\n",
    })
    imports = all_imports(src)
    assert upward_imports(imports, _TABLE) == [] and package_cycles(imports) == []
    assert layer_of("kvmmu", _TABLE) is None and layer_of("kvmmu.kvm.mmu.spte", _TABLE) == 3


def test_layer_table_is_read_from_the_document() -> None:
    doc = ("# x\n\n## Layers\n\n| rank | layer | modules |\n|---|---|---|\n| 0 | base | `kvmmu.errors` |\n"
           "| 1 | hw | `kvmmu.hw`, `kvmmu.real` (the real one) |\n\n## Next\n| 2 | no | `kvmmu.x` |\n")
    assert read_layer_table(doc) == [("base", ("kvmmu.errors",)), ("hw", ("kvmmu.hw", "kvmmu.real"))]
