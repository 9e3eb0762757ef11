"""Damaged recorded traces: `load_linux_boot(DIR)` and `read_trace(PATH)` raise ScenarioError (a
KvmmuError) naming the file and what is wrong, for every damage the reliability issue listed: a broken
gzip stream, bytes that are not UTF-8, a non-numeric field, a NUL, a 128 KiB field, JSON nested 5,000
deep, an integer of 5,000 digits, a directory or a missing path, and a vCPU index that is negative or
beyond the recorded machine's vCPUs.  Each damaged file is the good synthetic one with one thing broken.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmmu.errors import ScenarioError
from kvmmu.guest.linux_boot import load_linux_boot
from kvmmu.guest.trace import read_trace

from ..guest.trace_dir import write_trace_dir


def _csv(path: Path) -> Path:
    return path / "mmio_trace.csv"


def _edit_row(index: int, column: int, value: str) -> Callable[[Path], None]:
    """Set one field of data row `index` (0: the first row after the header)."""
    def edit(path: Path) -> None:
        lines = _csv(path).read_text().splitlines()
        cells = lines[1 + index].split(",")
        cells[column] = value
        lines[1 + index] = ",".join(cells)
        _csv(path).write_text("\n".join(lines) + "\n")
    return edit


def _first_mmio_row(path: Path) -> int:
    return next(i for i, line in enumerate(_csv(path).read_text().splitlines()[1:]) if ",mmio," in line)


def _gzip_damaged(path: Path) -> None:
    data = gzip.compress(_csv(path).read_bytes(), mtime=0)
    broken = data[:20] + bytes(b ^ 0x5A for b in data[20:60]) + data[60:]
    (path / "mmio_trace.csv.gz").write_bytes(broken)
    _csv(path).unlink()


def _gzip_truncated(path: Path) -> None:
    (path / "mmio_trace.csv.gz").write_bytes(gzip.compress(_csv(path).read_bytes(), mtime=0)[:-30])
    _csv(path).unlink()


def _append(data: bytes) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        with _csv(path).open("ab") as fh:
            fh.write(data)
    return edit


def _mmio_vcpu(value: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        _edit_row(_first_mmio_row(path), 1, value)(path)
    return edit


DAMAGES = {
    "gzip stream corrupted (zlib.error)": (_gzip_damaged, "damaged"),
    "gzip stream truncated": (_gzip_truncated, "damaged"),
    "not UTF-8": (_append(b"99,0,mmio,0,fee00030,4,\xff\xfe,apic,1,fee00030,4,firmware\n"), "UTF-8"),
    "a non-numeric vcpu": (_edit_row(1, 1, "zero"), "vcpu='zero'"),
    "a NUL byte": (_append(b"99,0,mm\x00io,0,fee00030,4,0,apic,1,fee00030,4,firmware\n"), "mmio_trace.csv"),
    "a 128 KiB field": (_append(b"99,0,mmio,0,fee00030,4,0," + b"a" * (129 << 10) + b",1,fee00030,4,x\n"),
                        "field larger than field limit"),
    "a vcpu of 5,000 digits": (_edit_row(1, 1, "9" * 5000), "column vcpu is longer"),
    "a vcpu of 13 digits": (_edit_row(1, 1, "9" * 13), "vcpu='9999999999999'"),
    "an address of 5,000 hex digits": (_edit_row(2, 4, "f" * 5000), "column addr is longer"),
    "an address beyond 52 bits": (lambda p: _edit_row(_first_mmio_row(p), 4, "1" + "0" * 13)(p), "52 bits"),
    "an mmio row of vCPU -1": (_mmio_vcpu("-1"), "vcpu='-1'"),
    "a dev row of vCPU -2": (_edit_row(0, 1, "-2"), "vcpu='-2'"),
    "a vCPU the machine does not have": (_mmio_vcpu("7"), "vcpu=7: the recorded machine has 4 vCPUs"),
    "a cpu_size that is no access size": (lambda p: _edit_row(_first_mmio_row(p), 10, "3")(p), "cpu_size="),
    "no memory map": (lambda p: (p / "mtree_flat.txt").unlink(), "mtree_flat.txt: missing"),
    "a memory map that is not UTF-8": (lambda p: (p / "mtree_flat.txt").write_bytes(b"\xff" * 10), "UTF-8"),
    "overlapping memslots": (lambda p: (p / "mtree_flat.txt").write_text(
        (p / "mtree_flat.txt").read_text().replace("00000000000c0000-00000000000dffff",
                                                   "0000000000090000-00000000000dffff")), "overlap"),
    "no trace file": (lambda p: _csv(p).unlink(), "not a trace directory"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_trace_directory_is_a_scenario_error(tmp_path: Path, damage: str) -> None:
    write_trace_dir(tmp_path, compress=False)
    load_linux_boot(tmp_path)                                   # the good directory loads
    edit, mention = DAMAGES[damage]
    edit(tmp_path)
    with pytest.raises(ScenarioError) as info:
        load_linux_boot(tmp_path)
    assert mention in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_path_or_a_file_is_not_a_trace_directory(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no such directory"):
        load_linux_boot(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ScenarioError, match="not a directory"):
        load_linux_boot(tmp_path / "notes.txt")


def _trace_file(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


GOOD_RECORD = b'{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 4}\n'


@pytest.mark.parametrize("name,data,mention", [
    ("deep.jsonl", b"[" * 5000 + b"]" * 5000 + b"\n", "line 1"),
    ("digits.jsonl", b'{"vcpu": ' + b"9" * 5000 + b', "op": "read", "gva": "0x1000", "size": 4}\n', "line 1"),
    ("nul.jsonl", GOOD_RECORD + b'{"vcpu": 0, "op": "re\x00ad", "gva": "0x1000", "size": 4}\n', "line 2"),
    ("latin1.jsonl", GOOD_RECORD + b'{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 4, "phase": "\xe9"}\n',
     "UTF-8"),
    ("broken.jsonl.gz", gzip.compress(GOOD_RECORD * 50, mtime=0)[:20] + b"\x00" * 40, "damaged"),
    ("long.jsonl", b'{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 4, "phase": "' + b"a" * 10000 + b'"}\n',
     "at most"),
])
def test_a_damaged_trace_file_is_a_scenario_error(tmp_path: Path, name: str, data: bytes, mention: str) -> None:
    path = _trace_file(tmp_path, name, data)
    with pytest.raises(ScenarioError) as info:
        list(read_trace(path))
    assert mention in str(info.value), str(info.value)


def test_a_trace_path_that_is_a_directory_or_missing(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot open"):
        list(read_trace(tmp_path))
    with pytest.raises(ScenarioError, match="cannot open"):
        list(read_trace(tmp_path / "absent.jsonl"))
