"""Booting L1: QEMU with TCG only (no host KVM), AMD SVM with nested paging, one job per boot.

The job's directory is shared writable into L1 and mounted at the same path inside the chroot, so
the job writes its results where the host reads them.  ``lab.env`` in it tells ``/init`` the module
parameters and the command (see ``initramfs.init_script``).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .initramfs import RESULTS_TAG, ROOT_TAG
from .setup import QEMU, LabError, LabKernel, cache_dir

CPU = "qemu64,+svm,+npt,+smep,+smap"
MEMORY_MB = 1536


def qemu_command(lab: LabKernel, run_dir: Path, memory_mb: int = MEMORY_MB) -> list[str]:
    """The QEMU command line of one L1 boot."""
    return [
        QEMU, "-accel", "tcg", "-machine", "pc", "-cpu", CPU, "-smp", "1", "-m", str(memory_mb),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", f"file:{run_dir / 'serial.log'}",
        "-kernel", lab.bzimage, "-initrd", lab.initramfs,
        "-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init",
        "-virtfs", f"local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on",
        "-virtfs", f"local,path={run_dir},mount_tag={RESULTS_TAG},security_model=none",
    ]


@dataclass
class Boot:
    run_dir: Path
    returncode: int | None      # the job's exit status inside L1 (None: it never finished)
    seconds: float
    serial: str

    @property
    def job_log(self) -> str:
        p = self.run_dir / "job.log"
        return p.read_text(errors="replace") if p.exists() else ""


def lab_env(kvm_params: dict[str, str], kvm_amd_params: dict[str, str], job: str, results_path: Path) -> str:
    def params(d: dict[str, str]) -> str:
        return " ".join(f"{k}={v}" for k, v in d.items())
    return (f"KVM_PARAMS={shlex.quote(params(kvm_params))}\nKVM_AMD_PARAMS={shlex.quote(params(kvm_amd_params))}\n"
            f"RESULTS_PATH={shlex.quote(str(results_path))}\nJOB={shlex.quote(job)}\n")


def new_run_dir(label: str, root: Path | None = None) -> Path:
    base = (root or cache_dir()) / "runs"
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = base / f"{stamp}-{label}{'' if i == 0 else f'-{i}'}"
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise LabError(f"cannot make a run directory under {base}")


def boot(lab: LabKernel, run_dir: Path, kvm_params: dict[str, str], kvm_amd_params: dict[str, str],
         job: str, timeout: float = 3600.0, quiet: bool = False) -> Boot:
    """Boot L1 once, run ``job`` (a shell command, in the chroot of the host's root) and power off."""
    (run_dir / "lab.env").write_text(lab_env(kvm_params, kvm_amd_params, job, run_dir))
    cmd = qemu_command(lab, run_dir)
    (run_dir / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except FileNotFoundError:
        raise LabError(f"{QEMU} is not installed (kvmmu lab setup)") from None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        if not quiet:
            print(f"lab: L1 did not power off within {timeout:.0f} s; killed", file=sys.stderr)
    seconds = time.monotonic() - t0
    (run_dir / "qemu.log").write_bytes(out or b"")
    serial_path = run_dir / "serial.log"
    serial = serial_path.read_text(errors="replace") if serial_path.exists() else ""
    rc_path = run_dir / "job.rc"
    rc = int(rc_path.read_text().strip() or -1) if rc_path.exists() else None
    if proc.returncode not in (0, None) and rc is None:
        raise LabError(f"{QEMU} exited {proc.returncode}: {(out or b'').decode(errors='replace').strip()[-300:]}")
    return Boot(run_dir, rc, seconds, serial)


__all__ = ["CPU", "Boot", "boot", "lab_env", "new_run_dir", "qemu_command"]
