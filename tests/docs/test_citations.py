"""The repository is self-contained: every document that code, tests or docs cite is in it.

A citation is a path of the form `docs/<name>.md` (or `docs/spec/<name>.md`) in any tracked text file;
each must exist.  Nothing may point outside the checkout (the reference folder beside it), which a user who clones the
project does not have.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"\bdocs/(?:[\w-]+/)*[\w.-]+\.md\b")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".cfg", ".txt"}


def _text_files() -> list[Path]:
    out = []
    for top in ("src", "tests", "docs", "benchmarks", "scenarios"):
        out += [p for p in (ROOT / top).rglob("*") if p.suffix in TEXT_SUFFIXES and ".venv" not in p.parts]
    return out + [ROOT / "README.md", ROOT / "Makefile"]


def test_every_cited_document_exists() -> None:
    missing = {}
    for path in _text_files():
        for cited in CITED.findall(path.read_text(encoding="utf-8", errors="replace")):
            if not (ROOT / cited).is_file():
                missing.setdefault(cited, str(path.relative_to(ROOT)))
    assert not missing, f"cited but not in the repository: {missing}"


def test_nothing_cites_outside_the_checkout() -> None:
    needle = "../" + "shared"          # spelled in two pieces so this file does not match itself
    outside = [str(p.relative_to(ROOT)) for p in _text_files()
               if needle in p.read_text(encoding="utf-8", errors="replace")]
    assert not outside, f"files citing {needle}: {outside}"
