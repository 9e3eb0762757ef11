"""The L1 initramfs: a newc archive the kernel (and GNU cpio) can read, with /init doing the steps in order."""

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from kvmmu.lab.initramfs import RESULTS_TAG, ROOT_TAG, Entry, build_initramfs, cpio_newc, init_script, parse_cpio_newc

SHARE = ["virtio_ring", "virtio", "virtio_pci", "9pnet", "9pnet_virtio", "netfs", "fscache", "9p"]
KVM = ["irqbypass", "kvm", "ccp", "kvm_amd"]


def _build(tmp_path: Path) -> bytes:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF-fake-busybox")
    mods = {}
    for m in SHARE + KVM:
        mods[m] = tmp_path / f"{m}.ko"
        mods[m].write_bytes(m.encode() * 3)
    return build_initramfs(busybox, mods, SHARE, KVM)


def test_archive_round_trip_and_layout(tmp_path: Path) -> None:
    entries = {e.path: e for e in parse_cpio_newc(gzip.decompress(_build(tmp_path)))}
    assert stat.S_ISREG(entries["init"].mode) and entries["init"].mode & 0o111
    assert entries["bin/busybox"].data == b"\x7fELF-fake-busybox"
    assert stat.S_ISLNK(entries["bin/sh"].mode) and entries["bin/sh"].target == "busybox"
    for m in SHARE + KVM:
        assert entries[f"modules/{m}.ko"].data == m.encode() * 3
    for d in ("proc", "sys", "dev", "host", "results"):
        assert stat.S_ISDIR(entries[d].mode)


def test_archive_is_deterministic(tmp_path: Path) -> None:
    assert _build(tmp_path) == _build(tmp_path)


def test_newc_header_alignment() -> None:
    blob = cpio_newc([Entry("a", 0o100644, b"xyz"), Entry("dir", 0o040755)])
    assert blob.startswith(b"070701") and len(blob) % 4 == 0
    # the second header starts on a 4-byte boundary right after the padded first member
    second = blob.index(b"070701", 6)
    assert second % 4 == 0 and blob[second + 110:second + 113] == b"dir"


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed")
def test_gnu_cpio_reads_it(tmp_path: Path) -> None:
    raw = gzip.decompress(_build(tmp_path))
    out = subprocess.run(["cpio", "-t", "--quiet"], input=raw, capture_output=True, check=True).stdout.decode()
    names = out.split()
    assert "init" in names and "bin/busybox" in names and "modules/kvm_amd.ko" in names


def test_init_order() -> None:
    text = init_script(SHARE, KVM)
    pos = {k: text.index(k) for k in ("for m in virtio_ring", f"{RESULTS_TAG} /results", ". /results/lab.env",
                                      "insmod /modules/kvm.ko $KVM_PARAMS", "kvm_amd.ko $KVM_AMD_PARAMS",
                                      f"{ROOT_TAG} /host", "tracefs /host/sys/kernel/tracing", "chroot /host",
                                      "poweroff -f")}
    assert list(pos.values()) == sorted(pos.values())
    # share modules in the order given (their dependency order), kvm's own dependencies before kvm
    assert "for m in " + " ".join(SHARE) + ";" in text
    assert "for m in irqbypass ccp;" in text
    assert "ro " + ROOT_TAG in text.replace("cache=loose,ro", "ro")
