"""Build the hot modules with mypyc: ``python -m kvmmu.tools.native build | clean | status``.

`make` runs ``build`` after installing the package (docs/performance.md).  It compiles
`kvmmu._native.NATIVE_MODULES` into extension modules beside their sources (and mypyc's shared
library into ``src/``), then writes the manifest `kvmmu._native` checks at import.  A tree whose
sources match the manifest is not rebuilt.  Where the build cannot run (no C compiler, no mypyc,
another interpreter) it says so in one line and leaves the Python source in charge: the exit status
is 0 unless ``--strict``, because a pure-Python kvmmu is a complete kvmmu, only slower.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvmmu import _native
from kvmmu._native import GROUP_NAME, MANIFEST, NATIVE_MODULES, compiled_modules, source_digest, source_path

SRC_ROOT = _native.PACKAGE_DIR.parent

# setup() runs in a child interpreter with the build directory as its working directory, so that
# no pyproject.toml of the project is read as the configuration of this throw-away build.
_SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify
paths = sys.argv[1].split(",")
setup(name="kvmmu-native", ext_modules=mypycify(paths, opt_level="3", group_name=sys.argv[2]),
      script_args=["build_ext", "--inplace", "--build-temp", "tmp"])
"""


def current_digests() -> dict[str, str]:
    return {m: source_digest(source_path(m)) for m in NATIVE_MODULES}


def up_to_date() -> bool:
    manifest = _native.read_manifest()
    return manifest is not None and _native.decide(manifest, current_digests(), {}, compiled_modules())[0]


def built_extensions() -> list[Path]:
    """Every extension module inside the package: kvmmu has none but mypyc's, of this build or an
    older one."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return [p for p in _native.PACKAGE_DIR.rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes))]


def clean() -> int:
    """Remove every extension module, the shared library and the manifest: the source runs again."""
    removed = 0
    for path in built_extensions():
        path.unlink()
        removed += 1
    for lib in SRC_ROOT.glob(f"{GROUP_NAME}__mypyc*"):
        lib.unlink()
        removed += 1
    if MANIFEST.exists():
        MANIFEST.unlink()
        removed += 1
    return removed


def build(verbose: bool = False) -> tuple[bool, str]:
    """Compile the group; (built?, one line saying what happened)."""
    if up_to_date():
        return True, f"kvmmu native: up to date ({len(NATIVE_MODULES)} modules compiled)"
    for needed in ("mypyc", "setuptools"):
        if importlib.util.find_spec(needed) is None:
            return False, f"kvmmu native: not built ({needed} is not installed); the Python source runs"
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        return False, "kvmmu native: not built (no C compiler); the Python source runs"
    clean()
    digests = current_digests()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvmmu-native-") as tmp:
        work = Path(tmp)
        # The whole package is copied so that mypy sees every module the compiled ones import.
        shutil.copytree(SRC_ROOT / "kvmmu", work / "kvmmu",
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "_native_manifest.json", "data"))
        paths = [str(Path(*m.split(".")).with_suffix(".py")) for m in NATIVE_MODULES]
        # The project's mypy configuration (which modules it holds clean); without it, mypy's errors
        # in modules outside the group would stop the build.
        config = SRC_ROOT.parent / "pyproject.toml"
        paths.append(f"--config-file={config}" if config.exists() else "--follow-imports=silent")
        proc = subprocess.run([sys.executable, "-c", _SETUP, ",".join(paths), GROUP_NAME], cwd=work,
                              capture_output=True, text=True, env={**os.environ, "MYPY_FORCE_COLOR": "0"})
        if verbose:
            sys.stdout.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            last = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error" in ln.lower()] or ["(no message)"]
            return False, f"kvmmu native: build failed ({last[0].strip()[:160]}); the Python source runs"
        for module in NATIVE_MODULES:
            rel = Path(*module.split("."))
            built = [p for p in (work / rel.parent).glob(rel.name + ".*") if p.suffix == ".so"]
            if len(built) != 1:
                return False, f"kvmmu native: build produced no extension for {module}; the Python source runs"
            shutil.copy2(built[0], SRC_ROOT / rel.parent / built[0].name)
        for lib in work.glob(f"{GROUP_NAME}__mypyc*.so"):
            shutil.copy2(lib, SRC_ROOT / lib.name)
    if current_digests() != digests:
        clean()
        return False, "kvmmu native: sources changed during the build; the Python source runs"
    MANIFEST.write_text(json.dumps({"python": sys.implementation.cache_tag, "modules": digests}, indent=1) + "\n")
    return True, f"kvmmu native: compiled {len(NATIVE_MODULES)} modules with mypyc in {time.monotonic() - t0:.0f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvmmu.tools.native", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("build", "clean", "status"))
    ap.add_argument("--strict", action="store_true", help="exit 1 when the build cannot be done")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the compiler's output")
    args = ap.parse_args(argv)
    if args.action == "clean":
        print(f"kvmmu native: removed {clean()} files")
        return 0
    if args.action == "status":
        compiled, why = _native.status()
        print(f"kvmmu native: {why}")
        return 0
    with contextlib.redirect_stdout(io.StringIO()) if not args.verbose else contextlib.nullcontext():
        ok, line = build(args.verbose)
    print(line)
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
