"""Every module of src/kvmmu is named on exactly one page of docs/architecture/, and every module a
page names exists.

A page names a module with a list item that starts with its path relative to src/kvmmu in
backticks ("- `kvm/mmu/spte.py` — ..."); a path mentioned in running text is a reference, not an
entry.  `__init__.py` and `__main__.py` need no entry (a page may still give one).

When a module is missing, the message says which page it belongs on: the page that lists the most
modules of its folder, else the page the "## Layers" table of docs/ARCHITECTURE.md gives for its layer.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path, PurePosixPath

from tests.docs.test_layers import layer_of, read_layer_table

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "kvmmu"
PAGES = ROOT / "docs" / "architecture"
ARCH_DOC = ROOT / "docs" / "ARCHITECTURE.md"
ENTRY = re.compile(r"^\s*[-*] `([\w./-]+\.py)`", re.MULTILINE)
EXEMPT = {"__init__.py", "__main__.py"}


def page_entries(text: str) -> list[str]:
    """The module paths a page lists, in order (a path twice on one page is listed twice)."""
    return ENTRY.findall(text)


def modules_of(pkg: Path) -> set[str]:
    """Every module of the package as a path relative to it, `__init__`/`__main__` left out."""
    return {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if p.name not in EXEMPT}


def layer_pages(arch_text: str) -> list[tuple[tuple[str, ...], str]]:
    """[(module prefixes, first page named), ...] from the "## Layers" table's fourth column."""
    section = arch_text.split("\n## Layers", 1)[-1].split("\n## ", 1)[0]
    out = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].isdigit():
            pages = re.findall(r"architecture/([\w.-]+\.md)", cells[3])
            out.append((tuple(re.findall(r"`(kvmmu(?:\.\w+)*)`", cells[2])), pages[0] if pages else "?"))
    return out


def _dotted(module: str) -> str:
    return "kvmmu." + PurePosixPath(module).with_suffix("").as_posix().replace("/", ".")


def home_page(module: str, listed: dict[str, list[str]], layers: list[tuple[tuple[str, ...], str]]) -> str:
    """The page a module belongs on: the one listing most of its folder's modules, else its layer's page."""
    folder = PurePosixPath(module).parent
    votes = Counter(page for page, mods in listed.items() for m in mods if PurePosixPath(m).parent == folder)
    if votes:
        return sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    table = [(str(i), prefixes) for i, (prefixes, _) in enumerate(layers)]
    rank = layer_of(_dotted(module), table)
    return layers[rank][1] if rank is not None else "(no layer in docs/ARCHITECTURE.md's table)"


def problems(modules: set[str], existing: set[str], pages: dict[str, str],
             layers: list[tuple[tuple[str, ...], str]]) -> list[str]:
    """What is wrong, one line each.  `modules` need an entry; `existing` may have one (modules plus
    the exempt files); `pages` maps a page's name to its text."""
    listed = {name: page_entries(text) for name, text in sorted(pages.items())}
    where: dict[str, list[str]] = {}
    for name, mods in listed.items():
        for m in mods:
            where.setdefault(m, []).append(name)
    out = []
    for m in sorted(modules - where.keys()):
        out.append(f"src/kvmmu/{m} is on no page of docs/architecture/: add it to "
                   f"docs/architecture/{home_page(m, listed, layers)}")
    for m, names in sorted(where.items()):
        if len(names) > 1:
            out.append(f"src/kvmmu/{m} is named on {len(names)} pages ({', '.join(names)}): keep one entry")
    by_name: dict[str, list[str]] = {}
    for m in existing:
        by_name.setdefault(PurePosixPath(m).name, []).append(m)
    for m, names in sorted(where.items()):
        if m not in existing:
            moved = [c for c in sorted(by_name.get(PurePosixPath(m).name, [])) if c not in where]
            hint = f" (moved to src/kvmmu/{moved[0]}?)" if moved else ""
            out.append(f"docs/architecture/{names[0]} names src/kvmmu/{m}, which does not exist{hint}: "
                       "remove or correct the entry")
    return out


def _check(pkg: Path, pages_dir: Path, arch_text: str) -> list[str]:
    existing = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py")}
    pages = {p.name: p.read_text(encoding="utf-8") for p in sorted(pages_dir.glob("*.md"))}
    return problems(modules_of(pkg), existing, pages, layer_pages(arch_text))


def test_every_module_is_on_exactly_one_page_and_every_entry_exists() -> None:
    found = _check(PKG, PAGES, ARCH_DOC.read_text(encoding="utf-8"))
    assert not found, "docs/architecture/ and src/kvmmu disagree:\n  " + "\n  ".join(found)


def test_every_layer_row_links_a_page_that_exists() -> None:
    text = ARCH_DOC.read_text(encoding="utf-8")
    rows = layer_pages(text)
    assert len(rows) == len(read_layer_table(text))
    assert all((PAGES / page).is_file() for _, page in rows), rows


# -- the checker itself --------------------------------------------------------------------------
_ARCH = ("## Layers\n\n| rank | layer | modules | page |\n|---|---|---|---|\n"
         "| 0 | base | `kvmmu.errors` | [b](architecture/base.md) |\n"
         "| 1 | kvm | `kvmmu.kvm` | [k](architecture/kvm.md), [m](architecture/kvm-mmu.md) |\n"
         "| 2 | guest | `kvmmu.guest` | [g](architecture/guest.md) |\n")


def _fixture(tmp_path: Path, pages: dict[str, str]) -> list[str]:
    pkg = tmp_path / "kvmmu"
    for f in ("__init__.py", "errors.py", "kvm/__init__.py", "kvm/vm.py", "kvm/vcpu.py", "kvm/mmu/spte.py",
              "kvm/mmu/fault.py", "kvm/mmu/new.py", "guest/os/kernel.py", "guest/__main__.py"):
        (pkg / f).parent.mkdir(parents=True, exist_ok=True)
        (pkg / f).write_text("")
    docs = tmp_path / "architecture"
    docs.mkdir()
    for name, text in pages.items():
        (docs / name).write_text(text)
    return _check(pkg, docs, _ARCH)


def test_checker_names_the_missing_the_doubled_and_the_stale(tmp_path: Path) -> None:
    found = _fixture(tmp_path, {
        "base.md": "# base\n- `errors.py` — errors\n",
        "kvm.md": "# kvm\n- `kvm/vm.py` — the VM\n- `kvm/vcpu.py` — a vCPU, not `kvm/mmu/new.py`\n"
                  "- `kvm/spte.py` — moved\n",
        "kvm-mmu.md": "# mmu\n- `kvm/mmu/spte.py` — sptes\n- `kvm/mmu/fault.py` — faults\n  - `kvm/vm.py` again\n",
        "guest.md": "# guest\nprose about `guest/os/kernel.py` is not an entry\n- `guest/__main__.py` — ok\n",
    })
    assert found == [
        "src/kvmmu/guest/os/kernel.py is on no page of docs/architecture/: add it to docs/architecture/guest.md",
        "src/kvmmu/kvm/mmu/new.py is on no page of docs/architecture/: add it to docs/architecture/kvm-mmu.md",
        "src/kvmmu/kvm/vm.py is named on 2 pages (kvm-mmu.md, kvm.md): keep one entry",
        "docs/architecture/kvm.md names src/kvmmu/kvm/spte.py, which does not exist: remove or correct the entry",
    ]


def test_checker_suggests_where_a_moved_module_went(tmp_path: Path) -> None:
    found = _fixture(tmp_path, {
        "kvm.md": "- `errors.py`\n- `kvm/vm.py`\n- `kvm/vcpu.py`\n- `kvm/mmu/spte.py`\n- `kvm/mmu/fault.py`\n"
                  "- `kvm/new.py`\n- `guest/os/kernel.py`\n",
    })
    assert found == [
        "src/kvmmu/kvm/mmu/new.py is on no page of docs/architecture/: add it to docs/architecture/kvm.md",
        "docs/architecture/kvm.md names src/kvmmu/kvm/new.py, which does not exist (moved to "
        "src/kvmmu/kvm/mmu/new.py?): remove or correct the entry",
    ]


def test_checker_passes_a_complete_set_of_pages(tmp_path: Path) -> None:
    assert _fixture(tmp_path, {
        "base.md": "- `errors.py` — errors\n",
        "kvm.md": "- `kvm/vm.py`\n- `kvm/vcpu.py`\n",
        "kvm-mmu.md": "* `kvm/mmu/spte.py`\n* `kvm/mmu/fault.py`\n* `kvm/mmu/new.py`\n",
        "guest.md": "- `guest/os/kernel.py`\n",
    }) == []
