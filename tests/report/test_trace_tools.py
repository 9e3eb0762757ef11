"""`kvmmu trace`, `kvmmu stat` and `kvmmu kvm-stat-report` on a small scenario: trace-cmd's report
layout, kvm_stat's modes and perf kvm stat's table, each checked against the same run's counters
(`kvmmu run --json`, KVM's statistics under KVM's names) and against the formats' own rules."""

from __future__ import annotations

import json
import re

import pytest

from tests.clirun import run_cli as _run

SCENARIO = """
name = "two"
duration_s = 0.01
[host]
cores = 2
[[vm]]
name = "a"
ram_mib = 64
vcpus = 2
mmu = "shadow"
mmio_caching = "generation"
[vm.os]
boot_console_bytes = 2
[vm.workload]
kind = "mmio-bench"
iterations = 400
[[vm]]
name = "b"
ram_mib = 64
vcpus = 1
mmu = "ept"
mmio_caching = "generation"
[vm.os]
boot_console_bytes = 2
[vm.workload]
kind = "mmio-bench"
iterations = 40
"""
LINE = re.compile(r"^ *CPU (\d+)/KVM-(\d+) \[(\d{3})\] +(\d+\.\d{6}): (\w+): +(.*)$")


@pytest.fixture
def scen(tmp_path):
    p = tmp_path / "two.toml"
    p.write_text(SCENARIO)
    return str(p)


def _run_json(capsys, scen, whole=False):
    code, out, _ = _run(capsys, "run", scen, "--json", "-q")
    assert code == 0
    doc = json.loads(out)
    return doc if whole else {v["name"]: v for v in doc["vms"]}


def test_trace_lines_are_merged_by_time_across_vcpus_and_vms(capsys, scen):
    code, out, _ = _run(capsys, "trace", scen, "-q")
    assert code == 0
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("#")]
    parsed = [LINE.match(ln) for ln in lines]
    assert all(parsed), next(ln for ln, m in zip(lines, parsed, strict=True) if not m)
    times = [float(m.group(4)) for m in parsed]
    assert times == sorted(times)
    assert {m.group(2) for m in parsed} >= {"4000", "4001", "4100"}       # both VMs, both vCPUs of a
    assert all(m.group(1) == str(int(m.group(3))) for m in parsed)         # the thread's vCPU is its [cpu]


def test_every_selected_event_is_shown_by_default_and_head_cuts(capsys, scen):
    _, out, _ = _run(capsys, "trace", scen, "-q")
    header = re.search(r"# ([\d,]+) events, ([\d,]+) selected, ([\d,]+) shown", out)
    assert header and header.group(2) == header.group(3)
    _, out, _ = _run(capsys, "trace", scen, "-q", "--head", "7")
    assert len([ln for ln in out.splitlines() if LINE.match(ln)]) == 7


def test_trace_exits_match_kvm_exits_statistic(capsys, scen):
    """Every exit KVM counts in `exits` during the run has its kvm_exit line (the boot's exits, made
    before the run starts, are in the statistic only)."""
    _, out, _ = _run(capsys, "trace", scen, "-q", "-e", "kvm_exit")
    per_vm = {"4000": 0, "4100": 0}
    for m in map(LINE.match, out.splitlines()):
        if m:
            per_vm[m.group(2)[:2] + "00"] += 1
    stats = _run_json(capsys, scen)
    assert 0 < per_vm["4000"] <= stats["a"]["kvm_vcpu_stats"]["exits"]
    assert 0 < per_vm["4100"] <= stats["b"]["kvm_vcpu_stats"]["exits"]


@pytest.mark.parametrize("bad", [["-e", "bogus"], ["-e", "kvm:nope*"], ["--head", "0"]])
def test_bad_selections_are_one_line_exit_2_before_running(capsys, scen, bad):
    code, out, err = _run(capsys, "trace", scen, "-q", *bad)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("kvmmu: error:")


def test_perfetto_export_reads_back_with_perfettos_schema(capsys, scen, tmp_path):
    """The export decodes with Perfetto's own protobuf schema: one process per VM, one thread per vCPU
    named as KVM names them, one instant per selected event, kvm_exit..kvm_entry slices."""
    from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb
    dest = tmp_path / "run.pftrace"
    code, out, _ = _run(capsys, "trace", scen, "-q", "-e", "kvm", "--export", str(dest))
    assert code == 0
    selected = int(re.search(r"([\d,]+) selected", out).group(1).replace(",", ""))
    trace = pb.Trace()
    trace.ParseFromString(dest.read_bytes())
    threads = {p.track_descriptor.thread.thread_name for p in trace.packet if p.track_descriptor.HasField("thread")}
    procs = {p.track_descriptor.process.process_name for p in trace.packet if p.track_descriptor.HasField("process")}
    assert threads == {"CPU 0/KVM", "CPU 1/KVM"} and procs == {"kvmmu VM a", "kvmmu VM b"}
    kinds = [p.track_event.type for p in trace.packet if p.HasField("track_event")]
    assert kinds.count(pb.TrackEvent.TYPE_INSTANT) == selected
    assert kinds.count(pb.TrackEvent.TYPE_SLICE_BEGIN) >= kinds.count(pb.TrackEvent.TYPE_SLICE_END) > 0
    stamps = [p.timestamp for p in trace.packet if p.HasField("track_event")]
    assert stamps == sorted(stamps)


def test_export_to_a_missing_directory_is_refused(capsys, scen, tmp_path):
    code, _, err = _run(capsys, "trace", scen, "-q", "--export", str(tmp_path / "no" / "x.pftrace"))
    assert code == 2 and "does not exist" in err


def test_kvm_stat_batch_totals_are_kvms_statistics(capsys, scen):
    """kvm_stat -1: each event's total is the statistic of the same run (summed over the VMs'
    vCPUs), and its rate is the total over the modelled run."""
    doc = _run_json(capsys, scen, whole=True)
    stats, seconds = {v["name"]: v for v in doc["vms"]}, doc["modelled_s"]
    code, out, _ = _run(capsys, "stat", scen, "-q", "-1")
    assert code == 0
    rows = {ln.split()[0]: (int(ln.split()[1]), int(ln.split()[2])) for ln in out.splitlines() if ln.strip()}
    for name in ("exits", "pf_taken", "pf_emulate", "mmio_exits", "pf_mmio_spte_created"):
        want = sum(v["kvm_vcpu_stats"][name] for v in stats.values())
        assert rows[name][0] == want, name
        assert abs(rows[name][1] - want / seconds) <= 1
    assert rows["mmu_shadow_zapped"][0] == sum(v["kvm_vm_stats"]["mmu_shadow_zapped"] for v in stats.values())
    reasons = {k: n for k, (n, _) in rows.items() if k.startswith("kvm_exit(")}
    assert sum(reasons.values()) == rows["kvm_exit"][0] > 0


def test_kvm_stat_guest_and_fields_filter(capsys, scen):
    stats = _run_json(capsys, scen)
    code, out, _ = _run(capsys, "stat", scen, "-q", "-1", "-g", "b", "-f", "^pf_")
    assert code == 0
    rows = {ln.split()[0]: int(ln.split()[1]) for ln in out.splitlines() if ln.strip()}
    assert rows and all(k.startswith("pf_") for k in rows)
    assert rows["pf_taken"] == stats["b"]["kvm_vcpu_stats"]["pf_taken"]


def test_kvm_stat_log_lines_add_up_to_the_totals(capsys, scen):
    """kvm_stat -l prints per-interval deltas: their sum is the run's total."""
    stats = _run_json(capsys, scen)
    code, out, _ = _run(capsys, "stat", scen, "-q", "-l", "--interval", "0.0002", "-f", "^exits$")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["time", "exits"]
    deltas = [int(ln.split()[1]) for ln in lines[1:]]
    assert len(deltas) >= 5 and sum(deltas) == sum(v["kvm_vcpu_stats"]["exits"] for v in stats.values())


@pytest.mark.parametrize("bad", [["-f", "("], ["-g", "nosuchvm"], ["--interval", "0"], ["--interval", "nan"]])
def test_kvm_stat_bad_input_is_one_line(capsys, scen, bad):
    code, out, err = _run(capsys, "stat", scen, "-q", "-1", *bad)
    assert code == 2 and err.count("\n") == 1 and err.startswith("kvmmu: error:")


def test_perf_kvm_stat_report_accounts_for_every_exit(capsys, scen):
    """perf kvm stat report: one row per exit reason; samples add up to the kvm_exit events, shares to
    100 %, min <= avg <= max."""
    code, out, _ = _run(capsys, "kvm-stat-report", scen, "-q")
    assert code == 0
    _, tr, _ = _run(capsys, "trace", scen, "-q", "-e", "kvm_exit")
    n_exits = len([ln for ln in tr.splitlines() if LINE.match(ln)])
    row = re.compile(r"^ *([\w ]+?) +(\d+) +([\d.]+)% +([\d.]+)% +([\d.]+)us +([\d.]+)us +([\d.]+)us")
    rows = [m for m in map(row.match, out.splitlines()) if m]
    assert {m.group(1) for m in rows} >= {"EXCEPTION_NMI", "EPT_VIOLATION"}
    assert sum(int(m.group(2)) for m in rows) == n_exits
    assert abs(sum(float(m.group(3)) for m in rows) - 100) < 0.1
    assert abs(sum(float(m.group(4)) for m in rows) - 100) < 0.1
    for m in rows:
        lo, hi, avg = float(m.group(5)), float(m.group(6)), float(m.group(7))
        assert lo <= avg <= hi
    assert f"Total Samples:{n_exits}," in out
