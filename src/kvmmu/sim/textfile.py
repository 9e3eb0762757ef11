"""Reading a small text file the user names: bounded, UTF-8, and every failure one typed error.

Scenarios, cost files and trace directories all go through it, so a file that is missing, a
directory, unreadable, too large or not UTF-8 gets the same one-line ScenarioError everywhere."""

from __future__ import annotations

from importlib.abc import Traversable
from pathlib import Path

from ..errors import ScenarioError


def read_text(path: Path | Traversable, where: str, limit: int, too_large: str, expected: str = "a file",
              utf8_hint: str = "") -> str:
    """The file's text; reads at most `limit` + 1 bytes, so a huge file costs no memory.
    `where` names the file in messages, `too_large` says what the file evidently is not."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(limit + 1)
    except FileNotFoundError:
        raise ScenarioError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ScenarioError(f"{where}: is a directory, not {expected}") from None
    except OSError as e:
        raise ScenarioError(f"{where}: cannot read it ({e.strerror or e})") from None
    if len(raw) > limit:
        raise ScenarioError(f"{where}: larger than {too_large}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{where}: not UTF-8 text (byte {e.start}){utf8_hint}") from None


__all__ = ["read_text"]
