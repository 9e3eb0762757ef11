"""Kernel modules of an unpacked kernel: their dependencies and the order to load them in.

A kernel package (``dpkg -x``) ships its modules without ``modules.dep`` (``depmod`` writes it at
install time), so the dependencies are read from each module's own ``.modinfo`` section
(``depends=a,b``), the same field depmod reads.  A locally built modules directory may carry
``modules.dep``; it is used when present.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..errors import ScenarioError

# What L1 needs: KVM with its AMD backend, and a 9p share over virtio-pci for the host's root.
KVM_MODULES = ("kvm", "kvm_amd")
SHARE_MODULES = ("virtio_pci", "9pnet_virtio", "9p")


def canonical(name: str) -> str:
    """Module names as the kernel compares them: '-' and '_' are the same character."""
    base = name.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def elf_section(data: bytes, wanted: str) -> bytes | None:
    """The contents of section ``wanted`` of a 64-bit little-endian ELF file (a ``.ko``)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ScenarioError("not a 64-bit little-endian ELF module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _n, str_off, str_size = header(shstrndx)
    names = data[str_off:str_off + str_size]
    for i in range(shnum):
        name, offset, size = header(i)
        if names[name:names.index(b"\0", name)].decode() == wanted:
            return data[offset:offset + size]
    return None


def modinfo(path: Path) -> dict[str, str]:
    """The ``key=value`` strings of a module's ``.modinfo`` section (last value wins)."""
    data = path.read_bytes()
    if path.suffix in (".xz", ".zst", ".gz"):
        raise ScenarioError(f"module {str(path)!r} is compressed; the lab needs plain .ko files "
                            "(busybox insmod cannot decompress)")
    section = elf_section(data, ".modinfo") or b""
    out: dict[str, str] = {}
    for item in section.split(b"\0"):
        if b"=" in item:
            key, value = item.decode(errors="replace").split("=", 1)
            out[key] = value
    return out


class ModuleTree:
    """The modules under ``/lib/modules/<release>``: name -> file, name -> dependencies."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, Path] = {}
        for f in sorted(root.rglob("*.ko*")):
            self.files.setdefault(canonical(f.name), f)
        builtin = root / "modules.builtin"
        self.builtin = ({canonical(line.strip()) for line in builtin.read_text().splitlines() if line.strip()}
                        if builtin.exists() else set())
        self._deps: dict[str, list[str]] = {}
        dep_file = root / "modules.dep"
        if dep_file.exists():
            self._deps = parse_modules_dep(dep_file.read_text())

    def depends(self, name: str) -> list[str]:
        name = canonical(name)
        if name in self._deps:
            return self._deps[name]
        if name not in self.files:
            raise ScenarioError(f"module {name!r} is neither in {str(self.root)!r} nor built in")
        raw = modinfo(self.files[name]).get("depends", "")
        self._deps[name] = [canonical(d) for d in raw.split(",") if d]
        return self._deps[name]

    def load_order(self, wanted: tuple[str, ...] | list[str]) -> list[str]:
        """``wanted`` and everything they depend on, each after its dependencies (built-ins left out)."""
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            name = canonical(name)
            if name in order or name in self.builtin and name not in self.files:
                return
            if name in visiting:
                raise ScenarioError(f"module dependency cycle through {name!r}")
            visiting.add(name)
            for dep in self.depends(name):
                visit(dep)
            visiting.discard(name)
            order.append(name)

        for w in wanted:
            visit(w)
        return order


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``modules.dep`` lines (``kernel/a.ko: kernel/b.ko kernel/c.ko``) -> {a: [b, c]}."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, deps = line.split(":", 1)
        out[canonical(mod.strip())] = [canonical(d) for d in deps.split()]
    return out


def kernel_release(modules_dir: Path) -> str:
    return modules_dir.name


__all__ = ["KVM_MODULES", "SHARE_MODULES", "ModuleTree", "canonical", "elf_section", "modinfo",
           "parse_modules_dep"]
