"""Building the lab once: Debian packages, a stock kernel unpacked (not installed), the initramfs.

Everything lands in a cache directory (``$KVMMU_LAB_CACHE`` or ``~/.cache/kvmmu-lab``)::

    debs/                   the kernel package as downloaded
    kernels/<release>/      the package unpacked with dpkg -x (boot/vmlinuz-*, lib/modules/<release>/)
    lab.json                which kernel the lab boots, its release, module load orders
    initramfs-<release>.cpio.gz
    runs/<id>/              one directory per L1 boot (lab.env, serial.log, job.log, results)

A KVM developer points the lab at another kernel with ``--kernel-deb FILE.deb`` (any Debian kernel
image package) or ``--bzimage arch/x86/boot/bzImage --modules /lib/modules/<release>`` (a local build
after ``make modules_install INSTALL_MOD_PATH=...``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ScenarioError
from .initramfs import build_initramfs
from .kmod import KVM_MODULES, SHARE_MODULES, ModuleTree

APT_PACKAGES = ("qemu-system-x86", "busybox-static", "cpio")
KERNEL_META = "linux-image-amd64"
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")


class LabError(ScenarioError):
    """The lab cannot be built or booted here; the message says which step and why."""


def cache_dir() -> Path:
    return Path(os.environ.get("KVMMU_LAB_CACHE") or Path.home() / ".cache" / "kvmmu-lab")


@dataclass
class LabKernel:
    """The kernel the lab boots and what the initramfs was built from."""

    source: str                # "debian:<package>", "deb:<file>" or "local:<bzImage>"
    release: str
    bzimage: str
    modules_dir: str
    initramfs: str
    share_modules: list[str]
    kvm_modules: list[str]

    def save(self, root: Path) -> None:
        (root / "lab.json").write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, root: Path | None = None) -> LabKernel | None:
        path = (root or cache_dir()) / "lab.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise LabError(f"{what}: {cmd[0]!r} is not installed") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        raise LabError(f"{what}: `{' '.join(cmd)}` exited {done.returncode}: {tail[0]}")
    return done.stdout


def install_packages(log: list[str]) -> None:
    """apt-get install the packages the lab runs on, unless their commands are already there."""
    if shutil.which(QEMU) and BUSYBOX.exists() and shutil.which("cpio"):
        log.append(f"packages: {', '.join(APT_PACKAGES)} already installed")
        return
    if not shutil.which("apt-get"):
        raise LabError(f"setup: no apt-get here; install {', '.join(APT_PACKAGES)} by hand")
    _run(["apt-get", "update", "-q"], "apt-get update")
    env_cmd = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q", *APT_PACKAGES]
    _run(env_cmd, "apt-get install")
    log.append(f"packages: installed {', '.join(APT_PACKAGES)}")


def stock_kernel_package() -> str:
    """The versioned kernel image package ``linux-image-amd64`` depends on (e.g. linux-image-6.1.0-57-amd64)."""
    out = _run(["apt-cache", "depends", KERNEL_META], f"apt-cache depends {KERNEL_META}")
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise LabError(f"setup: {KERNEL_META} depends on no linux-image-* package")


def fetch_kernel_deb(root: Path, package: str) -> Path:
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    have = sorted(debs.glob(f"{package}_*.deb"))
    if have:
        return have[-1]
    _run(["apt-get", "download", package], f"apt-get download {package}", cwd=debs)
    have = sorted(debs.glob(f"{package}_*.deb"))
    if not have:
        raise LabError(f"setup: apt-get download {package} left no .deb in {debs}")
    return have[-1]


def unpack_deb(root: Path, deb: Path) -> tuple[Path, Path]:
    """dpkg -x the package; returns (vmlinuz, lib/modules/<release>)."""
    target = root / "kernels" / deb.stem
    if not target.exists():
        tmp = target.with_name(target.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _run(["dpkg", "-x", str(deb), str(tmp)], f"dpkg -x {deb.name}")
        tmp.rename(target)
    images = sorted((target / "boot").glob("vmlinuz-*"))
    mods = sorted(p for p in (target / "lib" / "modules").glob("*") if p.is_dir()) if (
        target / "lib" / "modules").exists() else []
    if not images or not mods:
        raise LabError(f"setup: {deb.name} has no boot/vmlinuz-* or lib/modules/<release> "
                       "(not a kernel image package?)")
    return images[0], mods[0]


def setup(kernel_deb: str | None = None, bzimage: str | None = None, modules: str | None = None,
          root: Path | None = None, install: bool = True) -> tuple[LabKernel, list[str]]:
    """Build (or rebuild for another kernel) the lab; returns the kernel and a log of what was done."""
    root = root or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    if (bzimage is None) != (modules is None):
        raise LabError("setup: --bzimage and --modules go together (a kernel and its modules directory)")
    if kernel_deb and bzimage:
        raise LabError("setup: give either --kernel-deb or --bzimage/--modules, not both")
    if install:
        install_packages(log)
    if bzimage is not None and modules is not None:
        image, mods = Path(bzimage).resolve(), Path(modules).resolve()
        if not image.is_file():
            raise LabError(f"setup: --bzimage {bzimage!r} is not a file")
        if not mods.is_dir():
            raise LabError(f"setup: --modules {modules!r} is not a directory (want lib/modules/<release>)")
        source = f"local:{image}"
    else:
        if kernel_deb:
            deb = Path(kernel_deb).resolve()
            if not deb.is_file():
                raise LabError(f"setup: --kernel-deb {kernel_deb!r} is not a file")
            source = f"deb:{deb}"
        else:
            package = stock_kernel_package()
            deb = fetch_kernel_deb(root, package)
            source = f"debian:{package}"
        log.append(f"kernel: {deb.name}")
        image, mods = unpack_deb(root, deb)
    tree = ModuleTree(mods)
    share = tree.load_order(SHARE_MODULES)
    kvm = [m for m in tree.load_order(KVM_MODULES) if m not in share]
    if not BUSYBOX.exists():
        raise LabError(f"setup: {BUSYBOX} missing (apt-get install busybox-static)")
    blob = build_initramfs(BUSYBOX, tree.files, share, kvm)
    initrd = root / f"initramfs-{mods.name}.cpio.gz"
    initrd.write_bytes(blob)
    log.append(f"initramfs: {initrd} ({len(blob) >> 10} KiB; share modules {' '.join(share)}; "
               f"kvm modules {' '.join(kvm)})")
    lab = LabKernel(source, mods.name, str(image), str(mods), str(initrd), share, kvm)
    lab.save(root)
    return lab, log


def status(root: Path | None = None) -> list[str]:
    """What is set up, one fact per line (the CLI prints it)."""
    root = root or cache_dir()
    lines = [f"cache: {root}"]
    lines.append(f"{QEMU}: {shutil.which(QEMU) or 'missing (kvmmu lab setup installs qemu-system-x86)'}")
    lines.append(f"busybox: {BUSYBOX if BUSYBOX.exists() else 'missing'}")
    lab = LabKernel.load(root)
    if lab is None:
        lines.append("kernel: not set up (run `kvmmu lab setup`)")
        return lines
    lines.append(f"kernel: {lab.release} from {lab.source}")
    for what in ("bzimage", "initramfs"):
        p = Path(getattr(lab, what))
        lines.append(f"{what}: {p} {'ok' if p.exists() else 'MISSING'}")
    lines.append(f"modules: {' '.join(lab.share_modules + lab.kvm_modules)}")
    runs = sorted((root / "runs").glob("*")) if (root / "runs").exists() else []
    lines.append(f"runs: {len(runs)}" + (f" (last {runs[-1].name})" if runs else ""))
    return lines


def ready(root: Path | None = None) -> str | None:
    """None when the lab can boot, else why not (tests use it to skip)."""
    if not shutil.which(QEMU):
        return f"{QEMU} is not installed"
    lab = LabKernel.load(root)
    if lab is None:
        return "the lab is not set up (kvmmu lab setup)"
    for p in (lab.bzimage, lab.initramfs):
        if not Path(p).exists():
            return f"{p} is missing (kvmmu lab setup)"
    return None


__all__ = ["APT_PACKAGES", "LabError", "LabKernel", "cache_dir", "ready", "setup", "status", "stock_kernel_package"]
