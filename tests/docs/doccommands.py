"""The commands the README and docs/*.md show: every line of a fenced sh / shell / console / bash
block, and every indented (4-space) line that starts with `kvmmu` (docs/cli.md's synopsis,
docs/experiments.md's commands).  A trailing `# comment` is dropped; a console block's `$ ` prompt too."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELLS = ("sh", "shell", "console", "bash")
_FENCE = re.compile(r"^\s*```\s*([A-Za-z0-9_-]*)")
_COMMENT = re.compile(r"\s+#\s.*$")


@dataclass(frozen=True)
class DocCommand:
    doc: str          # path relative to the repository
    line: int
    text: str         # the command as the document shows it, without its comment

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def commands_in(path: Path, root: Path = ROOT) -> list[DocCommand]:
    out: list[DocCommand] = []
    fence: str | None = None
    rel = str(path.relative_to(root))
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = _FENCE.match(raw)
        if m:
            fence = None if fence is not None else m.group(1).lower()
            continue
        if fence is not None:
            if fence in SHELLS:
                text = raw.strip()
                if fence == "console":
                    if not text.startswith("$ "):
                        continue            # output
                    text = text[2:]
                text = _COMMENT.sub("", text).strip()
                if text and not text.startswith("#"):
                    out.append(DocCommand(rel, n, text))
            continue
        if raw.startswith("    kvmmu ") and not raw.startswith("     "):
            out.append(DocCommand(rel, n, _COMMENT.sub("", raw.strip()).strip()))
    return out


def all_commands(root: Path = ROOT) -> list[DocCommand]:
    return [c for p in doc_files(root) for c in commands_in(p, root)]
