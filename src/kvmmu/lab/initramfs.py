"""The L1 initramfs: busybox, the modules L1 needs, and an ``/init`` that runs one lab job.

The archive is a gzip-compressed cpio "newc" stream written here (no ``cpio`` binary needed), with
fixed mtimes and owners so the same inputs give the same bytes.

``/init`` (busybox sh) loads the share modules in dependency order, mounts the writable results
share, sources its ``lab.env`` (module parameters, the job command, where to mount the results in
the chroot), loads ``kvm`` and ``kvm_amd`` with those parameters, mounts the host's root read-only,
mounts proc/sys/dev/debugfs/tracefs and a tmpfs on /tmp inside it, and runs the job chrooted there.
Markers on the serial console (``KVMMU-LAB: ...``) let the host see how far L1 got.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT_TAG = "kvmmu_root"        # the host's / (read-only)
RESULTS_TAG = "kvmmu_results"  # the job's results directory (writable)
BUSYBOX_APPLETS = ("sh", "mount", "umount", "insmod", "chroot", "poweroff", "mkdir", "cat", "echo", "sleep",
                   "dmesg", "sync", "ls")

_S_IFDIR, _S_IFREG, _S_IFLNK = 0o040000, 0o100000, 0o120000


@dataclass(frozen=True)
class Entry:
    """One member of the archive: a directory, a regular file or a symlink (``target``)."""

    path: str
    mode: int
    data: bytes = b""
    target: str | None = None


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def cpio_newc(entries: Iterable[Entry]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks (``070701`` headers, 4-byte alignment)."""
    out = io.BytesIO()
    ino = 1
    for e in [*entries, Entry("TRAILER!!!", 0)]:
        body = e.target.encode() if e.target is not None else e.data
        name = e.path.lstrip("/").encode() + b"\0"
        is_trailer = e.path == "TRAILER!!!"
        fields = (0 if is_trailer else ino, e.mode, 0, 0, 2 if e.mode & _S_IFDIR == _S_IFDIR else 1, 0, len(body),
                  0, 0, 0, 0, len(name), 0)
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        out.write(header + name + _pad4(len(header) + len(name)) + body + _pad4(len(body)))
        ino += 1
    return out.getvalue()


def parse_cpio_newc(blob: bytes) -> list[Entry]:
    """Read back a newc archive (used by the tests and by ``kvmmu lab status``)."""
    out: list[Entry] = []
    pos = 0
    while True:
        if blob[pos:pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(blob[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = blob[pos:pos + namesize - 1].decode()
        pos += namesize + (-(110 + namesize) % 4)
        body = blob[pos:pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            return out
        if mode & 0o170000 == _S_IFLNK:
            out.append(Entry(name, mode, target=body.decode()))
        else:
            out.append(Entry(name, mode, body))


def init_script(share_modules: list[str], kvm_modules: list[str]) -> str:
    """``/init``: see the module docstring.  Module files live flat in ``/modules/<name>.ko``."""
    share = " ".join(share_modules)
    kvm_deps = " ".join(m for m in kvm_modules if m not in ("kvm", "kvm_amd"))
    return f"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "KVMMU-LAB: init"
for m in {share}; do insmod /modules/$m.ko || echo "KVMMU-LAB: insmod $m failed"; done
mkdir -p /results /host
mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose {RESULTS_TAG} /results || echo "KVMMU-LAB: no results share"
. /results/lab.env
for m in {kvm_deps}; do insmod /modules/$m.ko || echo "KVMMU-LAB: insmod $m failed"; done
insmod /modules/kvm.ko $KVM_PARAMS || echo "KVMMU-LAB: insmod kvm failed"
insmod /modules/kvm_amd.ko $KVM_AMD_PARAMS || echo "KVMMU-LAB: insmod kvm_amd failed"
mount -t 9p -o trans=virtio,version=9p2000.L,cache=loose,ro {ROOT_TAG} /host || echo "KVMMU-LAB: no root share"
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mount -t tmpfs tmp /host/tmp
mount -t debugfs debugfs /host/sys/kernel/debug
mount -t tracefs tracefs /host/sys/kernel/tracing
mount -o bind /results "/host$RESULTS_PATH"
echo "KVMMU-LAB: job start"
chroot /host /bin/sh -c "$JOB" > /results/job.log 2>&1
echo $? > /results/job.rc
dmesg > /results/dmesg.txt
echo "KVMMU-LAB: job done rc=$(cat /results/job.rc)"
umount "/host$RESULTS_PATH"
umount /results
sync
poweroff -f
"""


def build_initramfs(busybox: Path, modules: dict[str, Path], share_modules: list[str],
                    kvm_modules: list[str]) -> bytes:
    """The gzip'd archive: /bin/busybox (+ applet links), /modules/*.ko, /init."""
    entries = [Entry(d, _S_IFDIR | 0o755) for d in ("bin", "dev", "proc", "sys", "modules", "results", "host")]
    entries.append(Entry("bin/busybox", _S_IFREG | 0o755, busybox.read_bytes()))
    entries += [Entry(f"bin/{a}", _S_IFLNK | 0o777, target="busybox") for a in BUSYBOX_APPLETS]
    for name in [*share_modules, *kvm_modules]:
        entries.append(Entry(f"modules/{name}.ko", _S_IFREG | 0o644, modules[name].read_bytes()))
    entries.append(Entry("init", _S_IFREG | 0o755, init_script(share_modules, kvm_modules).encode()))
    return gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0)


__all__ = ["RESULTS_TAG", "ROOT_TAG", "Entry", "build_initramfs", "cpio_newc", "init_script", "parse_cpio_newc"]
