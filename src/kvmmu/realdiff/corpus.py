"""Loading a corpus: a folder of ``*.py`` files (or single files), each defining ``PROGRAMS`` (a list)
or ``PROGRAM``."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

from ..errors import KvmmuError, ScenarioError
from ..guest.runtime import Program


def _short(value: object) -> str:
    try:
        text = repr(value)
    except Exception:                       # a corpus object whose __repr__ fails is still named
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def load_programs(paths: Iterable[str | Path]) -> list[Program]:
    """Programs from corpus files / folders (``PROGRAMS`` list or ``PROGRAM`` in each ``*.py``)."""
    out: list[Program] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ScenarioError(f"corpus path {str(path)!r} does not exist")
        files = sorted(f for f in path.glob("*.py") if not f.name.startswith("_")) if path.is_dir() else [path]
        for f in files:
            spec = importlib.util.spec_from_file_location(f"kvmmu_corpus_{f.stem}_{abs(hash(str(f)))}", f)
            if spec is None or spec.loader is None:
                raise ScenarioError(f"cannot load corpus file {str(f)!r}")
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except KvmmuError:
                raise
            except SystemExit as e:
                # A corpus file is imported, never run as a script: exiting would end kvmmu itself.
                raise ScenarioError(f"corpus file {str(f)!r} called sys.exit({e.code!r}) while loading: a corpus "
                                    "file only defines PROGRAMS or PROGRAM") from None
            except Exception as e:
                msg = str(e).replace("\n", " ")[:200]
                raise ScenarioError(f"corpus file {str(f)!r} failed to load: {type(e).__name__}: {msg}") from None
            progs = getattr(module, "PROGRAMS", None)
            if progs is None and hasattr(module, "PROGRAM"):
                progs = [module.PROGRAM]
            if progs is None:
                raise ScenarioError(f"corpus file {str(f)!r} defines neither PROGRAMS nor PROGRAM")
            if not isinstance(progs, (list, tuple)):
                raise ScenarioError(f"corpus file {str(f)!r}: PROGRAMS = {_short(progs)}: a list of "
                                    "kvmmu.guest.runtime.Program")
            for prog in progs:
                if not isinstance(prog, Program):
                    raise ScenarioError(f"{str(f)!r}: {_short(prog)} is not a kvmmu.guest.runtime.Program")
                out.append(prog)
    names = [p.name for p in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ScenarioError(f"program names must be unique; repeated: {sorted(dup)}")
    return out
