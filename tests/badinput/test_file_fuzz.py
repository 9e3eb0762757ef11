"""Fuzz every file kvmmu reads: scenarios, cost files, kvmmu traces (JSON Lines), recorded boot-trace
directories and real-diff corpora.  The property, for any bytes: the reader returns a value or raises a
`KvmmuError` (no other exception, no traceback, no hang), and what it accepts has every number finite
and inside its stated range, before anything runs.

Inputs are the good files with random damage (bytes flipped, inserted, deleted, truncated) and with
random values put where numbers go (NaN, infinities, huge and tiny floats, huge and negative integers).
Bounded (a few dozen examples per reader, derandomised) so `make test` stays fast.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmmu.errors import KvmmuError
from kvmmu.guest.linux_boot import load_linux_boot
from kvmmu.guest.trace import read_trace
from kvmmu.realdiff import load_programs
from kvmmu.scenario import Scenario
from kvmmu.sim.cost import MAX_COST, CostModel

from ..guest.trace_dir import write_trace_dir
from .test_cli import GOOD_SCENARIO

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

NUMBERS = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "+inf", "1e-300", "1e300", "-1", "0", "-0.0", "1e-12", "1e12",
                     "9" * 30, "-" + "9" * 30, "0x7fffffffffffffff", "1.5", "true", '"5"', "[]", "{}"]),
    st.integers(-(1 << 70), 1 << 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).replace("nan", "nan")))


def _damage(data: bytes, draw: Any) -> bytes:
    """Flip, insert, delete bytes or truncate, a few times."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and out:
            del out[at:at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del out[at:]
    return bytes(out)


@st.composite
def damaged(draw: Any, data: bytes) -> bytes:
    return _damage(data, draw)


@st.composite
def renumbered(draw: Any, text: str) -> str:
    """`text` (key = value lines) with the values of a few numeric keys replaced."""
    lines = text.splitlines()
    numeric = [i for i, line in enumerate(lines) if " = " in line and line.split(" = ", 1)[1][:1] in "0123456789-"]
    for i in draw(st.lists(st.sampled_from(numeric), min_size=1, max_size=3)):
        key = lines[i].split(" = ", 1)[0]
        lines[i] = f"{key} = {draw(NUMBERS)}"
    return "\n".join(lines) + "\n"


def _floats(obj: Any, seen: set[int] | None = None) -> Iterator[float]:
    """Every float reachable from a loaded object (dataclasses, dicts, lists)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, float):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _floats(getattr(obj, f.name), seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _floats(v, seen)


def _accepted_scenario_is_in_range(sc: Scenario) -> None:
    assert all(math.isfinite(x) for x in _floats(sc)), sc
    assert 0 < sc.duration_s <= 86400 and 10 <= sc.slice_us <= 1e6
    assert sc.sample_ms == 0 or 0.001 <= sc.sample_ms <= sc.duration_s * 1000
    for plan in sc.vms:
        assert all(math.isfinite(x) for x in _floats(plan.workload_params))
    assert all(0 <= c <= MAX_COST for c in sc.cost.as_dict().values())


CHURN = GOOD_SCENARIO.split("[vm.workload]")[0] + ("[vm.workload]\nkind = \"memslot-churn\"\nperiod_us = 2000.0\n"
                                                   "hotplug_mib = 16\ndisplay_hz = 30\nram_pages = 64\n")
NETPERF = GOOD_SCENARIO.split("[vm.workload]")[0] + ("[vm.workload]\nkind = \"netperf-rr\"\nrtt_us = 50.0\n"
                                                     "stack_us = 10.0\nstreams = 1\n")
WITH_HOST_AND_OS = GOOD_SCENARIO.replace("seed = 1", "seed = 1\nsample_ms = 1.0\nslice_us = 1000.0") + \
    "[cost]\nvm_exit = 1200\n[os]\nhz = 250\nghz = 2.5\ncost_fault = 1500\n"
SCENARIOS = [GOOD_SCENARIO, CHURN, NETPERF, WITH_HOST_AND_OS]


@FUZZ
@given(st.sampled_from(SCENARIOS).flatmap(lambda s: st.one_of(renumbered(s), damaged(s.encode()))))
def test_any_scenario_file_is_loaded_or_refused(text: str | bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        try:
            sc = Scenario.load(path)
        except KvmmuError:
            return
        _accepted_scenario_is_in_range(sc)


COST_TOML = "vm_exit = 1200\nguest_pte_read = 60\nuserspace_exit = 6000\nhost_swapin = 250000\n"


@FUZZ
@given(st.one_of(renumbered(COST_TOML).map(lambda t: ("c.toml", t.encode())),
                 damaged(COST_TOML.encode()).map(lambda b: ("c.toml", b)),
                 damaged(b'{"vm_exit": 1200, "guest_pte_read": 60}').map(lambda b: ("c.json", b)),
                 NUMBERS.map(lambda n: ("c.json", f'{{"vm_exit": {n}}}'.encode()))))
def test_any_cost_file_is_loaded_or_refused(named: tuple[str, bytes]) -> None:
    name, data = named
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        try:
            cost = CostModel.from_file(path)
        except KvmmuError:
            return
        assert all(isinstance(c, int) and 0 <= c <= MAX_COST for c in cost.as_dict().values())


TRACE = (b'{"format": "kvmmu-trace", "version": 1}\n'
         b'{"vcpu": 0, "op": "read", "gva": "0xffffffffff5fd030", "size": 4, "value": "0x50014", '
         b'"gpa": "0xfee00030"}\n'
         b'{"vcpu": 1, "op": "write", "gva": "0x1000", "size": 8, "value": "0x3", "phase": "boot", "seq": 7}\n'
         b'{"vcpu": 0, "op": "invlpg", "gva": "0x1000", "cr3": "0x5000"}\n')


@FUZZ
@given(st.one_of(damaged(TRACE).map(lambda b: ("t.jsonl", b)),
                 damaged(gzip.compress(TRACE, mtime=0)).map(lambda b: ("t.jsonl.gz", b)),
                 NUMBERS.map(lambda n: ("t.jsonl", f'{{"vcpu": {n}, "op": "read", "gva": "0x1", "size": 1}}\n'
                                        .encode()))))
def test_any_trace_file_is_read_or_refused(named: tuple[str, bytes]) -> None:
    name, data = named
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        try:
            records = list(read_trace(path))
        except KvmmuError:
            return
        for r in records:
            assert 0 <= r.vcpu <= 1023 and 0 <= r.gva < 1 << 64 and r.size in (0, 1, 2, 4, 8, 16)


_GOOD_DIR = Path(tempfile.mkdtemp(prefix="kvmmu-fuzz-trace-"))
write_trace_dir(_GOOD_DIR, compress=False)
_GOOD_FILES = {f.name: f.read_bytes() for f in _GOOD_DIR.iterdir()}
shutil.rmtree(_GOOD_DIR)


@FUZZ
@given(st.sampled_from(["mmio_trace.csv", "mmio_trace.csv.gz", "mtree_flat.txt", "guest_iomem.txt", "README.md"])
       .flatmap(lambda name: st.tuples(st.just(name), damaged(
           gzip.compress(_GOOD_FILES["mmio_trace.csv"], mtime=0) if name.endswith(".gz") else _GOOD_FILES[name]))))
def test_any_trace_directory_is_loaded_or_refused(damage: tuple[str, bytes]) -> None:
    name, data = damage
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for n, content in _GOOD_FILES.items():
            if not (name.endswith(".gz") and n == "mmio_trace.csv"):
                (root / n).write_bytes(content)
        (root / name).write_bytes(data)
        try:
            w = load_linux_boot(root)
        except KvmmuError:
            return
        assert 1 <= w.nr_vcpus <= 1024
        assert all(0 <= r.vcpu < w.nr_vcpus and 0 <= r.gva < 1 << 64 for r in w.records)
        assert all(0 <= m.start < m.end <= 1 << 52 for m in w.memory)


CORPUS_VALUES = st.one_of(
    st.sampled_from(["5", "None", "'text'", "[5]", "[None, 1]", "{'a': 1}", "(1, 2)", "[[]]", "object()",
                     "type('X', (), {'__repr__': lambda s: 1 / 0})()"]),
    st.integers().map(str), st.text(max_size=10).map(repr))
CORPUS_BODIES = st.one_of(
    CORPUS_VALUES.map(lambda v: f"PROGRAMS = {v}\n"),
    CORPUS_VALUES.map(lambda v: f"PROGRAM = {v}\n"),
    st.sampled_from(["0", "1", "'bye'", "None"]).map(lambda c: f"import sys\nsys.exit({c})\n"),
    st.sampled_from(["ValueError('x')", "RecursionError", "MemoryError", "SyntaxError('s')",
                     "OSError(5, 'io')"]).map(lambda e: f"raise {e}\n"),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)


@FUZZ
@given(CORPUS_BODIES)
def test_any_corpus_file_is_loaded_or_refused(body: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz_corpus.py"
        path.write_text(body, encoding="utf-8", errors="surrogateescape")
        try:
            programs = load_programs([path])
        except KvmmuError:
            return
        assert programs == []           # none of the bodies defines a real Program
