"""The public API: what the README and docs use is importable from `kvmmu` itself, and every
`__all__` names only what exists.  The README's first example runs as printed."""

from __future__ import annotations

import contextlib
import importlib
import io
import pkgutil
import re
from pathlib import Path

import kvmmu

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _first_python_block(text: str) -> str:
    m = re.search(r"```python\n(.*?)```", text, re.S)
    assert m, "the README has no python example"
    return m.group(1)


def test_the_readme_example_needs_only_kvmmu_and_runs() -> None:
    code = _first_python_block((ROOT / "README.md").read_text(encoding="utf-8"))
    imported = set(re.findall(r"^(?:from|import) (kvmmu[\w.]*)", code, re.M))
    assert imported <= {"kvmmu", "kvmmu.bits"}, f"the first example reaches into sub-packages: {imported}"
    env: dict[str, object] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "README.md", "exec"), env)
    r, vcpu = env["r"], env["vcpu"]
    # The handler's value comes back; a first access to an unbacked gpa under today's design takes
    # the full path and creates one MMIO spte (docs/spec/kvm-mmu.md, Appendix A scenarios 1 and 7).
    assert r.value == 0x1234 and r.fault is None
    assert vcpu.stats["pf_mmio_spte_created"] == 1 and vcpu.stats["mmio_exits"] == 1


def test_every_all_names_something_that_exists() -> None:
    for info in pkgutil.walk_packages(kvmmu.__path__, "kvmmu."):
        if info.name.startswith("kvmmu.lab.guest") or info.name.endswith(".__main__"):
            continue                       # runs inside the lab's L1 only; a command, not a module
        mod = importlib.import_module(info.name)
        for name in getattr(mod, "__all__", ()):
            assert hasattr(mod, name), f"{info.name}.__all__ names {name!r}, which it does not define"


def test_the_names_the_docs_use_from_kvmmu_are_exported() -> None:
    used: set[str] = set()
    for doc in DOCS:
        for m in re.finditer(r"\bkvmmu\.([A-Za-z_]\w*)(?![\w.])", doc.read_text(encoding="utf-8")):
            used.add(m.group(1))
    subpackages = {m.name for m in pkgutil.iter_modules(kvmmu.__path__)}
    missing = sorted(n for n in used - subpackages if n not in kvmmu.__all__ and not n.endswith(("md", "py")))
    assert not missing, f"docs use kvmmu.{missing} but kvmmu does not export them"
