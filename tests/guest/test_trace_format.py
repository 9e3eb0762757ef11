"""The kvmmu trace format (JSON Lines): what a valid record is, and that every kind of bad line is refused
with a ScenarioError naming the line, the field and the rule (kvmmu.guest.trace_format module docstring)."""

from __future__ import annotations

import gzip
import io

import pytest

from kvmmu import ScenarioError
from kvmmu.guest.trace import TraceRecord, read_trace, trace_text, write_trace

HEADER = '{"format": "kvmmu-trace", "version": 1}\n'


def records(text: str) -> list[TraceRecord]:
    return list(read_trace(io.StringIO(text)))


def bad(text: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        records(text)
    return info.value


def test_a_valid_access_carries_every_documented_field() -> None:
    """A record names its vCPU, op, gva and size; value, gpa, control registers, cpl, phase, region and
    seq are optional and come back as integers / strings."""
    (r,) = records(HEADER + '{"vcpu": 1, "op": "read", "gva": "0xffffffffff5fd030", "size": 4, '
                   '"value": "0x50014", "gpa": "0xfee00030", "cr0": "0x80050033", "cr3": "0x1000000", '
                   '"cr4": "0xb0", "efer": "0xd01", "cpl": 0, "phase": "kernel-boot", "region": "apic", '
                   '"seq": 7}\n')
    assert (r.vcpu, r.op, r.gva, r.size, r.value, r.gpa) == (1, "read", 0xFFFFFFFFFF5FD030, 4, 0x50014, 0xFEE00030)
    assert (r.cr0, r.cr3, r.cr4, r.efer, r.cpl) == (0x80050033, 0x1000000, 0xB0, 0xD01, 0)
    assert (r.phase, r.region, r.seq, r.line) == ("kernel-boot", "apic", 7, 2)


def test_optional_fields_default_to_none_and_blank_lines_are_skipped() -> None:
    """Without a header version 1 is assumed; empty lines are ignored but still count as lines."""
    rs = records('\n{"vcpu": 0, "op": "write", "gva": "0xb8000", "size": 2, "value": "0x720"}\n\n'
                 '{"vcpu": 0, "op": "fetch", "gva": "0xfffffff0", "size": 16}\n'
                 '{"vcpu": 0, "op": "invlpg", "gva": "0xffffcf2640055000"}\n')
    assert [(r.op, r.size, r.value, r.gpa, r.line) for r in rs] == [
        ("write", 2, 0x720, None, 2), ("fetch", 16, None, None, 4), ("invlpg", 0, None, None, 5)]


@pytest.mark.parametrize("size", [1, 2, 4, 8, 16])
def test_every_access_size_is_accepted(size: int) -> None:
    """Sizes 1, 2, 4, 8 and 16 bytes; a value may use all of them."""
    value = (1 << (8 * size)) - 1
    (r,) = records(f'{{"vcpu": 0, "op": "read", "gva": "0x1000", "size": {size}, "value": "{value:#x}"}}\n')
    assert (r.size, r.value) == (size, value)


def test_writer_and_reader_round_trip(tmp_path) -> None:
    """write_trace emits a header and one line per record; read_trace (also through .gz) gives them back."""
    rs = [TraceRecord(0, "read", 0xFEE00030, 4, 0x14, 0xFEE00030, cr0=0x11, cr3=0, cr4=0, efer=0, phase="firmware",
                      region="apic", seq=1262),
          TraceRecord(1, "write", 0xFFFFCF2640055000, 8, (1 << 64) - 1, 0xFE003000, cpl=0),
          TraceRecord(1, "invlpg", 0xFFFFCF2640055000)]
    text = trace_text(rs, description="three records")
    assert text.splitlines()[0].startswith('{"format": "kvmmu-trace", "version": 1')
    back = records(text)
    assert [r.to_json() for r in back] == [r.to_json() for r in rs]
    path = tmp_path / "t.jsonl.gz"
    assert write_trace(rs, path) == 3
    assert [r.to_json() for r in read_trace(path)] == [r.to_json() for r in rs]
    with gzip.open(path, "rt") as fh:
        assert len(fh.read().splitlines()) == 4


# -- bad lines: each names the line number, the field and the rule -------------------------------------
GOOD = '{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 4}\n'


@pytest.mark.parametrize(("line", "fieldname", "rule"), [
    ('{"vcpu": 0, "op": "read", "gva": "0x1000", "si', "record", "truncated"),
    ('{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 4', "record", "truncated"),
    ('{"vcpu": 0, "op": "read", "gva": 0x1000, "size": 4}', "record", "not valid JSON"),
    ('[0, "read", "0x1000", 4]', "record", "one JSON object"),
    ('{"vcpu": 0, "op": "read", "gva": "0x10g0", "size": 4}', "gva", "hex"),
    ('{"vcpu": 0, "op": "read", "gva": "1000", "size": 4}', "gva", "hex"),
    ('{"vcpu": 0, "op": "read", "gva": 4096, "size": 4}', "gva", "hex"),
    ('{"vcpu": 0, "op": "read", "gva": "0x10000000000000000", "size": 4}', "gva", "64 bits"),
    ('{"vcpu": 0, "op": "write", "gva": "0x1000", "size": 4, "value": "0xzz"}', "value", "hex"),
    ('{"vcpu": 0, "op": "write", "gva": "0x1000", "size": 2, "value": "0x10000"}', "value", "16 bits"),
    ('{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 3}', "size", "1, 2, 4, 8 or 16"),
    ('{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 32}', "size", "1, 2, 4, 8 or 16"),
    ('{"vcpu": 0, "op": "read", "gva": "0x1000", "size": "4"}', "size", "1, 2, 4, 8 or 16"),
    ('{"vcpu": 0, "op": "read", "gva": "0x1000"}', "size", "needs a size"),
    ('{"vcpu": 0, "op": "load", "gva": "0x1000", "size": 4}', "op", "read, write, fetch, invlpg"),
    ('{"vcpu": 0, "gva": "0x1000", "size": 4}', "op", "required"),
    ('{"vcpu": null, "op": "read", "gva": "0x1000", "size": 4}', "vcpu", "required"),
    ('{"vcpu": 0, "op": "read", "gva": null, "size": 4}', "gva", "required"),
    ('{"vcpu": -1, "op": "read", "gva": "0x1000", "size": 4}', "vcpu", "integer from 0 to 1023"),
    ('{"vcpu": true, "op": "read", "gva": "0x1000", "size": 4}', "vcpu", "integer from 0 to 1023"),
    ('{"vcpu": 1024, "op": "read", "gva": "0x1000", "size": 4}', "vcpu", "integer from 0 to 1023"),
    ('{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 4, "gpa": "0xfee00004"}', "gpa", "page offset"),
    ('{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 4, "gpa": "0x10000000000000"}', "gpa", "52 bits"),
    ('{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 4, "cpl": 4}', "cpl", "0, 1, 2 or 3"),
    ('{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 4, "cr3": 4096}', "cr3", "hex"),
    ('{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 4, "phase": ""}', "phase", "non-empty string"),
    ('{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 4, "sise": 4}', "sise", "not a field"),
    ('{"vcpu": 0, "op": "invlpg", "gva": "0x1000", "size": 4}', "size", "invlpg record has no size"),
])
def test_a_bad_line_names_line_field_and_rule(line: str, fieldname: str, rule: str) -> None:
    """The reader stops at the first bad line: the error says which line (counting the header), which
    field, and which rule of the format it breaks."""
    err = bad(HEADER + GOOD + line + "\n" + GOOD)
    assert err.line == 3 and err.field == fieldname
    assert "line 3" in str(err) and repr(fieldname)[1:-1] in str(err)
    assert rule in str(err)


def test_records_before_a_bad_line_are_streamed() -> None:
    """Reading is streaming: the good records before a bad line are delivered before the error."""
    it = read_trace(io.StringIO(GOOD + GOOD + '{"vcpu": 0, "op": "read", "gva": "0x1000", "size": 5}\n'))
    assert next(it).line == 1 and next(it).line == 2
    with pytest.raises(ScenarioError, match="line 3"):
        next(it)


@pytest.mark.parametrize(("header", "fieldname"), [
    ('{"format": "kvmmu-trace", "version": 2}', "version"),
    ('{"format": "pcap", "version": 1}', "format"),
])
def test_an_unknown_header_is_refused(header: str, fieldname: str) -> None:
    """Only version 1 of the kvmmu-trace format is understood."""
    err = bad(header + "\n" + GOOD)
    assert (err.line, err.field) == (1, fieldname)


def test_a_truncated_gzip_file_is_a_scenario_error(tmp_path) -> None:
    """A compressed trace cut short is reported as damaged, not as a Python traceback."""
    path = tmp_path / "t.jsonl.gz"
    write_trace([TraceRecord(0, "read", 0x1000 + 8 * i, 8) for i in range(2000)], path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ScenarioError):
        list(read_trace(path))


def test_a_missing_file_is_a_scenario_error(tmp_path) -> None:
    with pytest.raises(ScenarioError, match="cannot open"):
        list(read_trace(tmp_path / "nope.jsonl"))
