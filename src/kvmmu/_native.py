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

# The modules compiled by `kvmmu.tools.native`: the paths a fault, a walk and a TLB hit run through
# (the SDM's rules, the modelled CPU, KVM's MMU and emulator).  They are mypy-clean, and mypyc checks
# at run time the types mypy checks statically.  Modules whose public functions validate what a user
# passes (hw/host.py, kvm/memslots.py, kvm/vm.py, kvm/vcpu.py) stay interpreted: a compiled signature
# would refuse a wrong type with a TypeError before the check that names the value and the rule.
NATIVE_MODULES = (
    "kvmmu.arch.bits", "kvmmu.arch.index", "kvmmu.arch.modes", "kvmmu.arch.permission", "kvmmu.arch.walker",
    "kvmmu.hw.memory", "kvmmu.hw.vmcs", "kvmmu.hw.cpu", "kvmmu.hw.tdp",
    "kvmmu.kvm.emulate",
    "kvmmu.kvm.mmu.context", "kvmmu.kvm.mmu.direct", "kvmmu.kvm.mmu.fault", "kvmmu.kvm.mmu.gpte",
    "kvmmu.kvm.mmu.guest_reader", "kvmmu.kvm.mmu.hugepage", "kvmmu.kvm.mmu.install", "kvmmu.kvm.mmu.mmio",
    "kvmmu.kvm.mmu.mmio_cache", "kvmmu.kvm.mmu.mmu", "kvmmu.kvm.mmu.nested_ept", "kvmmu.kvm.mmu.page",
    "kvmmu.kvm.mmu.page_track", "kvmmu.kvm.mmu.paging", "kvmmu.kvm.mmu.pf", "kvmmu.kvm.mmu.shadow_iter",
    "kvmmu.kvm.mmu.spte", "kvmmu.kvm.mmu.tdp_iter", "kvmmu.kvm.mmu.tdp_mmu",
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


def compiled_modules(modules: tuple[str, ...] | set[str] = NATIVE_MODULES) -> set[str]:
    """Those of `modules` that have an extension module beside their source."""
    return {m for m in modules if extension_path(m) is not None}


def read_manifest() -> dict | None:
    """The manifest the last build wrote, or None (never built, removed, or unreadable)."""
    try:
        return json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return None


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Imports the named modules from their .py files even where an extension module sits beside."""

    def __init__(self, modules: set[str]) -> None:
        self.modules = modules

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.modules:
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
    extensions = compiled_modules()
    manifest = read_manifest() if extensions else None
    digests = {m: source_digest(source_path(m)) for m in NATIVE_MODULES} if manifest else {}
    COMPILED, STATUS = decide(manifest, digests, os.environ, extensions)
    if not COMPILED:
        # Every extension of the group, and of the module list the last build had (one that has
        # left the list was compiled against a shared library that will no longer hold it).
        recorded = set(manifest.get("modules", {})) if manifest else set()
        source_first = extensions | compiled_modules({m for m in recorded if source_path(m).exists()})
        if source_first:
            sys.meta_path.insert(0, _SourceFirst(source_first))


install()


def status() -> tuple[bool, str]:
    """(True, ...) when the hot modules run compiled in this process; the reason either way."""
    return COMPILED, STATUS
