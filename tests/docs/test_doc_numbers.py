"""The numbers the README and docs/experiments.md quote from `make demo` are what `kvmmu demo`
prints now: a change that moves them fails here until the docs are updated from a real run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmmu.report.demo import run_demo

ROOT = Path(__file__).resolve().parents[2]


def _plain_table(text: str) -> tuple[list[str], list[list[str]]]:
    """format_table's layout: a header, a line of dashes, rows; columns two or more spaces apart."""
    lines = text.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith("MMU "))
    spans = [m.span() for m in re.finditer(r"-+", lines[i + 1])]   # every cell is padded to its column

    def cut(ln: str) -> list[str]:
        return [ln[a:b].strip() for a, b in spans]
    header = cut(lines[i])
    rows = []
    for ln in lines[i + 2:]:
        if not ln.strip():
            break
        rows.append(cut(ln))
    return header, rows


def _norm(v: str) -> str:
    return v.replace(",", "").replace(" %", "%").strip()


@pytest.fixture(scope="module")
def demo() -> dict[tuple[str, str], dict[str, str]]:
    header, rows = _plain_table(run_demo())
    return {(r[0], r[1]): dict(zip(header, r, strict=True)) for r in rows}


def test_the_experiments_table_is_the_demo_output(demo) -> None:
    text = (ROOT / "docs/experiments.md").read_text(encoding="utf-8")
    start = text.index("`kvmmu demo` (0.25 modelled s")
    lines = []
    for ln in text[start:].splitlines()[1:]:          # the first table after the heading line, only
        if ln.startswith("|"):
            lines.append(ln)
        elif lines:
            break
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert len(rows) == len(demo) == 6
    for r in rows:
        got = demo[(r[0], r[1])]
        for name, value in zip(header[2:], r[2:], strict=True):
            assert _norm(value) == _norm(got[name]), f"docs/experiments.md {r[0]}/{r[1]} {name}: {value} vs {got[name]}"


def test_the_readme_quotes_the_demo(demo) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8").replace("\n", " ")
    m = re.search(r"row `shadow / zap \(2011 design\)`: ([\d,]+) of ([\d,]+) \(([\d.]+) %\).*?under EPT ([\d,]+) of "
                  r"([\d,]+)", text)
    assert m, "the README's quote of the demo is not where it used to be"
    shadow, ept = demo[("shadow", "zap (2011 design)")], demo[("ept", "zap (2011 design)")]
    assert _norm(m.group(1)) == _norm(shadow["missed fast path"])
    assert _norm(m.group(2)) == _norm(shadow["MMIO accesses"])
    assert _norm(m.group(3)) + "%" == _norm(shadow["miss rate"])
    assert _norm(m.group(4)) == _norm(ept["missed fast path"])
    assert _norm(m.group(5)) == _norm(ept["MMIO accesses"])
