"""The repository is self-contained: every document, section and anchor that code, tests or docs cite
is in it.

What is checked, in every text file of src/, tests/, docs/, benchmarks/, scenarios/, README.md and
the Makefile:

- a path `docs/<name>.md` (or `docs/spec/<name>.md`, `docs/architecture/<name>.md`) must exist;
- any other name ending in `.md` must be a file next to the citing file, under the checkout, or the
  name of one of the repository's documents (running text says "`kvm-mmu.md`" for the spec);
- nothing may point outside the checkout (the reference folder beside it, `../shared`), which a user
  who clones the project does not have;
- a section of the repository's own specification cited as `§n.m` must exist in docs/spec: the
  document is the one named just before the citation ("docs/spec/x86-access.md §5.9"), else the first
  spec document the file names, else docs/spec/kvm-mmu.md; a citation right after "SDM", "APM" or
  "Vol." is the vendor's manual and not checked.  A section is a numbered heading, or item k of a
  numbered list under heading n (so "§5.4" is item 4 of "## 5.");
- "Appendix A row n" (or scenario n) and "Appendix A invariant n" must exist in docs/spec/kvm-mmu.md;
- a named section after a document (`docs/cli.md, "Conventions"`) must be a heading of it, the start
  of a bold lead-in or the start of a list item;
- a Markdown link's `#anchor` must be the anchor of a heading of the target.

The spec documents themselves are not checked for `§` (they cite the SDM's chapters by bare number).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEC_DIR = ROOT / "docs" / "spec"
TEXT_SUFFIXES = {".py", ".md", ".toml", ".cfg", ".txt"}

DOCS_PATH = re.compile(r"\bdocs/(?:[\w-]+/)*[\w.-]+\.md\b")
OTHER_MD = re.compile(r"(?<![\w/.-])((?:\.\.?/)*(?:[\w-]+/)*[\w-][\w.-]*\.md)\b")
OUTSIDE = re.compile(r"(?:\.\./)+" + "shared" + r"\b")      # (in pieces, so this line does not match itself)
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")
SPEC_NAME = re.compile(r"(?:docs/spec/)?\b(kvm-mmu|x86-access|kvm-pvm-host)\.md\b")
VENDOR = re.compile(r"\b(?:SDM|APM|Vol\.)")
RUN_GAP = re.compile(r"(?:[\s,/+()\-–`]|\band\b|\bor\b|§\s?\d+(?:\.\d+)*)*")
APPENDIX = re.compile(r"Appendix A,? (rows?|scenarios?|invariants?) (\d+)(?:\s*(?:-|–|and|,)\s*(\d+))?")
NAMED = re.compile(r"\b(docs/(?:[\w-]+/)*[\w.-]+\.md)`?(?:,\s*|\s*\(\s*|\s+)[\"“]([A-Za-z`][^\"”]*)[\"”]")
MD_LINK = re.compile(r"\]\(([\w./-]+\.md)#([\w-]+)\)")


@dataclass(frozen=True)
class Spec:
    """What docs/spec offers to cite: each document's sections, Appendix A's rows and invariants."""
    sections: dict[str, set[str]]
    appendix_rows: set[int]
    appendix_invariants: set[int]


def spec_sections(text: str) -> set[str]:
    """Numbered headings ("## 3.", "### 3.5", "#### 3.5.1") and item k of a numbered list under one."""
    out: set[str] = set()
    current = None
    for line in text.splitlines():
        head = re.match(r"#+\s+(\d+(?:\.\d+)*)\.?\s", line)
        if head:
            current = head.group(1)
            out.add(current)
        elif line.startswith("#"):
            current = None
        else:
            item = re.match(r"(\d+)\.\s", line)
            if item and current is not None:
                out.add(f"{current}.{item.group(1)}")
    return out


def appendix_a(text: str) -> tuple[set[int], set[int]]:
    """(table rows, numbered invariants) of "## Appendix A"."""
    body = text.split("\n## Appendix A", 1)[-1] if "\n## Appendix A" in text else ""
    body = body.split("\n## ", 1)[0]
    rows = {int(m) for m in re.findall(r"^\|\s*(\d+)\s*\|", body, re.MULTILINE)}
    invariants = {int(m) for m in re.findall(r"^(\d+)\.\s", body, re.MULTILINE)}
    return rows, invariants


def load_spec(spec_dir: Path = SPEC_DIR) -> Spec:
    texts = {p.name: p.read_text(encoding="utf-8") for p in sorted(spec_dir.glob("*.md"))}
    rows, invariants = appendix_a(texts.get("kvm-mmu.md", ""))
    return Spec({name: spec_sections(t) for name, t in texts.items()}, rows, invariants)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _norm(s: str) -> str:
    return " ".join(re.sub(r"\n\s*#\s*", " ", s).replace("`", "").split()).casefold()


def section_names(text: str) -> tuple[list[str], list[str]]:
    """(headings, lead-ins: bold spans and list-item openings), normalised, of a Markdown document."""
    heads = [_norm(re.sub(r"^#+\s+", "", line)) for line in text.splitlines() if line.startswith("#")]
    leads = [_norm(m) for m in re.findall(r"\*\*([^*]+)\*\*", text)]
    leads += [_norm(m) for m in re.findall(r"^\s*[-*] (.+)$", text, re.MULTILINE)]
    return heads, leads


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _resolves(name: str, here: Path, root: Path, doc_names: set[str]) -> bool:
    """Beside the citing file, under the checkout or under docs/ ("architecture/kvm.md"), or a bare
    document name."""
    return (here.parent / name).is_file() or (root / name).is_file() or (root / "docs" / name).is_file() or (
        "/" not in name and name in doc_names)


def check_text(text: str, path: Path, root: Path, spec: Spec, doc_names: set[str]) -> list[str]:
    """Every citation in `text` (the file at `path`) that does not resolve, one line each."""
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    out: list[str] = []
    for m in DOCS_PATH.finditer(text):
        if not (root / m.group(0)).is_file():
            out.append(f"{rel}:{_line(text, m.start())}: cites {m.group(0)}, which the repository does not contain")
    for m in OTHER_MD.finditer(text):
        name = m.group(1)
        if text[max(0, m.start() - 5):m.start()].endswith("docs/") or name.startswith("docs/"):
            continue                                    # (a docs/ path: checked above)
        if not _resolves(name, path, root, doc_names):
            out.append(f"{rel}:{_line(text, m.start())}: cites {name}, which the repository does not contain")
    for m in OUTSIDE.finditer(text):
        out.append(f"{rel}:{_line(text, m.start())}: cites {m.group(0)}, outside the checkout")
    if not rel.startswith("docs/spec/"):
        out += _check_sections(text, rel, spec)
    for m in NAMED.finditer(text):
        target = root / m.group(1)
        if not target.is_file() or target.suffix != ".md":
            continue
        heads, leads = section_names(target.read_text(encoding="utf-8"))
        name = _norm(m.group(2))
        if not any(name in h for h in heads) and not any(lead.startswith(name) for lead in leads):
            out.append(f"{rel}:{_line(text, m.start())}: cites {m.group(1)}, \"{m.group(2)}\", which is no "
                       "heading, bold lead-in or list item there")
    if path.suffix == ".md":
        for m in MD_LINK.finditer(text):
            target = path.parent / m.group(1)
            if target.is_file():
                heads = [_anchor(re.sub(r"^#+\s+", "", line)) for line in
                         target.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
                if m.group(2) not in heads:
                    out.append(f"{rel}:{_line(text, m.start())}: links {m.group(1)}#{m.group(2)}, "
                               "an anchor no heading there has")
    return out


def _check_sections(text: str, rel: str, spec: Spec) -> list[str]:
    out = []
    first = SPEC_NAME.search(text)
    default = f"{first.group(1)}.md" if first else "kvm-mmu.md"
    for m in SECTION.finditer(text):
        start = m.start()
        doc = None
        for d in SPEC_NAME.finditer(text, max(0, start - 200), start):
            if RUN_GAP.fullmatch(text, d.end(), start):
                doc = f"{d.group(1)}.md"                  # "docs/spec/x.md §a, §b": the run names it
        if doc is None:
            window = text[max(0, start - 120):start]
            vendor = list(VENDOR.finditer(window))
            if vendor and not SPEC_NAME.search(window, vendor[-1].end()):
                continue                                  # the SDM's or the APM's own numbering
            doc = default
        if m.group(1) not in spec.sections.get(doc, set()):
            out.append(f"{rel}:{_line(text, start)}: cites §{m.group(1)} of docs/spec/{doc}, which has no such "
                       "section")
    for m in APPENDIX.finditer(text):
        numbers = {int(m.group(2))} | ({int(m.group(3))} if m.group(3) else set())
        have = spec.appendix_invariants if m.group(1).startswith("invariant") else spec.appendix_rows
        for n in sorted(numbers - have):
            out.append(f"{rel}:{_line(text, m.start())}: cites Appendix A {m.group(1)} {n} of "
                       "docs/spec/kvm-mmu.md, which has no such entry")
    return out


def _text_files(root: Path = ROOT) -> list[Path]:
    out = []
    for top in ("src", "tests", "docs", "benchmarks", "scenarios"):
        out += [p for p in (root / top).rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()
                and not any(part == ".venv" or part.endswith(".egg-info") for part in p.parts)]
    return out + [root / "README.md", root / "Makefile"]


def _all_problems() -> list[str]:
    spec = load_spec()
    files = _text_files()
    doc_names = {p.name for p in files if p.suffix == ".md"}
    out = []
    for path in files:
        if path == Path(__file__).resolve():
            continue                    # (its own bad examples: the checker's tests below run on them)
        out += check_text(path.read_text(encoding="utf-8", errors="replace"), path, ROOT, spec, doc_names)
    return out


def test_every_citation_resolves() -> None:
    problems = _all_problems()
    assert not problems, "citations the repository cannot answer:\n  " + "\n  ".join(problems)


# -- the checker itself --------------------------------------------------------------------------
_SPEC_TEXT = ("# spec\n## 1. One\n### 1.1 A\n## 2. Two\n1. first\n2. second\n## Appendix A. Rows\n\n"
              "1. an invariant\n\n| # | set-up |\n|---|---|\n| 1 | x |\n| 2 | y |\n")


def _problems(tmp_path: Path, text: str, name: str = "src/mod.py") -> list[str]:
    (tmp_path / "docs" / "spec").mkdir(parents=True, exist_ok=True)
    (tmp_path / "docs" / "spec" / "kvm-mmu.md").write_text(_SPEC_TEXT)
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Conventions\n\n- **Errors** are one line.\n"
                                                "- Exit status: 0.\n")
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return [p.split(": ", 1)[1] for p in
            check_text(text, path, tmp_path, load_spec(tmp_path / "docs" / "spec"), {"kvm-mmu.md", "guide.md"})]


def test_checker_accepts_what_exists(tmp_path: Path) -> None:
    good = ('"""docs/spec/kvm-mmu.md §1.1, §2 and §2.2; `kvm-mmu.md` §1; SDM Vol. 3A §4.6.1 and §4.7.\n'
            'Appendix A row 2, Appendix A rows 1-2, Appendix A invariant 1 (docs/guide.md, "Conventions";\n'
            'docs/guide.md, "Errors"; docs/guide.md ("Exit status")."""\n')
    assert _problems(tmp_path, good) == []
    assert _problems(tmp_path, "See [the guide](guide.md#conventions).\n", "docs/x.md") == []


def test_checker_names_every_kind_of_bad_citation(tmp_path: Path) -> None:
    docs_ = "docs" + "/"
    bad = (f"{docs_}kvm-mmu-spec.md and {docs_}x86-access-rules.md and {docs_}real-kvm-on-these-machines.md\n"
           "real-kvm-on-these-machines.md, " + "../" + "shared/notes.md\n"
           "§" + "3.3 and " + f"{docs_}spec/kvm-mmu.md " + "§" + "2.7; Appendix A row 9, Appendix A invariant 4\n"
           f'{docs_}guide.md, "Bugs the fuzzer found"\n')
    assert _problems(tmp_path, bad) == [
        "cites docs/kvm-mmu-spec.md, which the repository does not contain",
        "cites docs/x86-access-rules.md, which the repository does not contain",
        "cites docs/real-kvm-on-these-machines.md, which the repository does not contain",
        "cites real-kvm-on-these-machines.md, which the repository does not contain",
        "cites ../shared/notes.md, which the repository does not contain",
        "cites ../shared, outside the checkout",
        "cites §3.3 of docs/spec/kvm-mmu.md, which has no such section",
        "cites §2.7 of docs/spec/kvm-mmu.md, which has no such section",
        "cites Appendix A row 9 of docs/spec/kvm-mmu.md, which has no such entry",
        "cites Appendix A invariant 4 of docs/spec/kvm-mmu.md, which has no such entry",
        'cites docs/guide.md, "Bugs the fuzzer found", which is no heading, bold lead-in or list item there',
    ]
    assert _problems(tmp_path, "[g](guide.md#no-such-heading)\n", "docs/y.md") == [
        "links guide.md#no-such-heading, an anchor no heading there has"]
