"""Which hot modules run compiled (mypyc) and which run as the Python source beside them.

`python -m kvmmu.tools.native build` compiles the modules of `NATIVE_MODULES` with mypyc into
extension modules next to their sources and records each source's SHA-256 in a manifest.  Python's
import system prefers an extension module to a source file of the same name, so a built tree runs
the compiled code.  This module, imported first by `kvmmu/__init__.py`, decides once per process
whether that is right, and when it is not, makes every module of the group import from source:

- ``KVMMU_PURE=1`` in the environment asks for the Python source (the reference path);
- a source that differs from the one compiled (edited since the build) makes the build stale.

The compiled modules call each other directly, not through their Python modules, so the group is
all or nothing: one stale source sends every module of the group to its source.

Nothing here imports kvmmu: it runs before any other kvmmu module is imported.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

# The modules compiled by `kvmmu.tools.native`: the paths a fault, a walk and a TLB hit run through.
# They are mypy-clean (Makefile TYPED); mypyc checks at run time the types mypy checks statically.
NATIVE_MODULES = (
    "kvmmu.arch.bits", "kvmmu.arch.index", "kvmmu.arch.modes", "kvmmu.arch.permission", "kvmmu.arch.walker",
    "kvmmu.hw.memory", "kvmmu.hw.vmcs", "kvmmu.hw.cpu", "kvmmu.hw.tdp",
)
GROUP_NAME = "kvmmu_native"          # mypyc's shared library: src/kvmmu_native__mypyc.<abi>.so
PACKAGE_DIR = Path(__file__).resolve().parent
MANIFEST = PACKAGE_DIR / "_native_manifest.json"
PURE_ENV = "KVMMU_PURE"


def source_path(module: str) -> Path:
    return PACKAGE_DIR.parent.joinpath(*module.split(".")).with_suffix(".py")


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def decide(manifest: dict | None, digests: dict[str, str], environ: dict[str, str] | os._Environ[str],
           extensions: set[str]) -> tuple[bool, str]:
    """(compiled?, why) for a manifest as the build wrote it, the current sources' digests, the
    environment and the modules that have an extension module on disk."""
    if environ.get(PURE_ENV, "") not in ("", "0"):
        return False, f"{PURE_ENV}={environ[PURE_ENV]}: Python source"
    if manifest is None:
        return False, "not built (python -m kvmmu.tools.native build): Python source"
    if manifest.get("python") != sys.implementation.cache_tag:
        return False, f"built for {manifest.get('python')}, this is {sys.implementation.cache_tag}: Python source"
    recorded: dict[str, str] = manifest.get("modules", {})
    if set(recorded) - set(NATIVE_MODULES):
        # The shared library holds those too, compiled against one another: it must be rebuilt.
        return False, f"built with {sorted(set(recorded) - set(NATIVE_MODULES))[0]} too: Python source"
    for module in NATIVE_MODULES:
        if module not in recorded or module not in extensions:
            return False, f"{module} was not compiled: Python source"
        if recorded[module] != digests.get(module):
            return False, f"{module} changed since the build (rebuild: make native): Python source"
    return True, f"compiled with mypyc ({len(NATIVE_MODULES)} modules)"


def extension_path(module: str) -> Path | None:
    src = source_path(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = src.with_suffix(suffix)
        if candidate.exists():
            return candidate
    return None


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Imports the group's modules from their .py files even where an extension module sits beside."""

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in NATIVE_MODULES:
            return None
        src = source_path(fullname)
        return importlib.util.spec_from_file_location(
            fullname, src, loader=importlib.machinery.SourceFileLoader(fullname, str(src)))


COMPILED = False
STATUS = ""


def install() -> None:
    """Decide for this process (once) and, when the source must run, put the source-first finder in front."""
    global COMPILED, STATUS
    if STATUS:
        return
    extensions = {m for m in NATIVE_MODULES if extension_path(m) is not None}
    manifest = None
    if extensions and MANIFEST.exists():
        try:
            manifest = json.loads(MANIFEST.read_text())
        except (OSError, ValueError):
            manifest = None
    digests = {m: source_digest(source_path(m)) for m in NATIVE_MODULES} if manifest else {}
    COMPILED, STATUS = decide(manifest, digests, os.environ, extensions)
    if not COMPILED and extensions:
        sys.meta_path.insert(0, _SourceFirst())


install()


def status() -> tuple[bool, str]:
    """(True, ...) when the hot modules run compiled in this process; the reason either way."""
    return COMPILED, STATUS
