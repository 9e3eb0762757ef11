"""Every `kvmmu` command, and the one-line exit-2 errors for bad input."""

import csv
import io
import json

import pytest

from kvmmu.cli import main
from tests.clirun import run_cli as _run

TINY = """
name = "t"
duration_s = 0.01
[host]
cores = 2
[[vm]]
name = "g"
ram_mib = 64
vcpus = 1
mmu = "shadow"
mmio_caching = "generation"
[vm.os]
boot_console_bytes = 2
[vm.workload]
kind = "mmio-bench"
iterations = 50
"""


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return str(p)


def test_run_prints_kvm_counters_and_cost(capsys, tiny):
    code, out, err = _run(capsys, "run", tiny, "--quiet")
    assert code == 0 and err == ""
    assert "pf_taken" in out and "missed the fast path" in out and "VM exits" in out
    assert "guest native work" in out


def test_run_json_has_the_counts_the_bench_implies(capsys, tiny):
    code, out, _ = _run(capsys, "run", tiny, "--json", "-q")
    d = json.loads(out)
    g = d["vms"][0]
    assert d["stopped_by"] == "workload done"
    # 50 writes to pci-testdev: the first creates the MMIO spte, 49 take the fast path; the two boot
    # console bytes are a read of LSR and a write of THR each, on another page (1 miss, 3 fast).
    assert g["workload"]["iterations"] == 50
    assert g["guest"]["mmio_slow_path"] >= 2
    assert g["kvm_vcpu_stats"]["pf_mmio_spte_created"] >= 2
    assert set(g["cost"]) >= {"VM exits", "userspace (KVM_EXIT_MMIO)"}


def test_run_csv(capsys, tiny):
    code, out, _ = _run(capsys, "run", tiny, "--csv", "-q")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["vm", "section", "name", "value"]
    assert rows[[r[2] for r in rows].index("mmio_exits")][:3] == ["g", "kvm_vcpu_stats", "mmio_exits"]


def test_run_override_policy_and_output_file(capsys, tiny, tmp_path):
    out_file = tmp_path / "r.json"
    code, out, _ = _run(capsys, "run", tiny, "--policy", "off", "--json", "-q", "-o", str(out_file))
    assert code == 0 and out == ""
    d = json.loads(out_file.read_text())
    assert d["vms"][0]["mmio_caching"] == "off"
    assert d["vms"][0]["kvm_vcpu_stats"]["pf_mmio_spte_created"] == 0       # no MMIO sptes without caching


def test_compare_one_table_with_ratios(capsys, tiny):
    code, out, _ = _run(capsys, "compare", tiny, "--mmus", "shadow", "--policies", "off,generation", "-q")
    assert code == 0
    assert "shadow/off" in out and "shadow/generation" in out and "(x" in out
    line = next(x for x in out.splitlines() if x.startswith("MMIO: missed the fast path"))
    assert "(x0." in line                                  # fewer misses with caching


def test_compare_csv(capsys, tiny):
    code, out, _ = _run(capsys, "compare", tiny, "--mmus", "ept", "--policies", "zap", "--csv", "-q")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["metric", "ept/zap"]


def test_explain_fast_path(capsys):
    code, out, _ = _run(capsys, "explain", "--target", "testdev", "--warm", "1")
    assert code == 0
    assert "MMIO spte" in out and "Path taken: the MMIO fast path" in out and "KVM_EXIT_MMIO" in out


def test_explain_first_access_creates_the_mmio_spte(capsys):
    code, out, _ = _run(capsys, "explain", "--target", "testdev", "--warm", "0", "--mmu", "ept")
    assert "mark_mmio_spte" in out and "pf_mmio_spte_created +1" in out


def test_explain_user_page_is_a_guest_page_fault(capsys):
    code, out, _ = _run(capsys, "explain", "--target", "user")
    assert "#PF(" in out and "pf_guest +1" in out


def test_trace_prints_trace_cmd_lines(capsys, tiny):
    code, out, _ = _run(capsys, "trace", tiny, "--events", "kvm_page_fault,mark_mmio_spte", "-q")
    assert code == 0
    lines = [x for x in out.splitlines() if not x.startswith("#")]
    assert lines and all("kvm_page_fault:" in x or "mark_mmio_spte:" in x for x in lines if x)
    assert "CPU 0/KVM" in lines[0]


def test_plot_png_or_a_clear_message(capsys, tiny, tmp_path):
    png = tmp_path / "p.png"
    code, out, err = _run(capsys, "plot", tiny, "-o", str(png), "-q")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 2 and err.count("\n") == 1 and "matplotlib" in err
        return
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_prints_experiment_a(capsys, monkeypatch):
    import kvmmu.report.demo as demo
    monkeypatch.setattr(demo, "DEMO_DURATION_S", 0.002)
    code, out, _ = _run(capsys, "demo", "-q")
    assert code == 0 and "Experiment (a)" in out
    assert out.count("shadow") >= 3 and out.count("ept") >= 3


BAD = {
    "missing vm": ('name = "x"\n', "missing key 'vm'"),
    "wrong type": ('[[vm]]\nram_mib = "512"\n[vm.workload]\nkind = "mmio-bench"\n', "ram_mib"),
    "unknown key": ('[[vm]]\nrammib = 512\n', "rammib"),
    "missing workload": ('[[vm]]\nram_mib = 64\n', "workload"),
    "missing kind": ('[[vm]]\nram_mib = 64\n[vm.workload]\njobs = 2\n', "workload.kind"),
    "bad workload param": ('[workload]\nkind = "netperf-rr"\nrtt = 3\n[[vm]]\nram_mib = 64\n', "rtt"),
    "impossible hole": ('[workload]\nkind = "mmio-bench"\n[[vm]]\npci_hole_start = 0x12345000\n',
                        "pci_hole_start"),
    "impossible host": ('[host]\nmemory_mib = 256\nreserved_mib = 512\n[workload]\nkind = "mmio-bench"\n'
                        '[[vm]]\nram_mib = 64\n', "reserved_mib"),
    "bad flavour": ('[workload]\nkind = "mmio-bench"\n[[vm]]\nmmu = "tdp"\n', "mmu"),
    "negative duration": ('duration_s = -1\n[workload]\nkind = "mmio-bench"\n[[vm]]\n', "duration_s"),
    "bad os": ('[os]\nhz = "fast"\n[workload]\nkind = "mmio-bench"\n[[vm]]\n', "hz"),
    "bad toml": ("[[vm]\n", "not valid TOML"),
    "bad cost": ('[cost]\nvm_exit = -5\n[workload]\nkind = "mmio-bench"\n[[vm]]\n', "vm_exit"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_scenarios_one_line_exit_2(capsys, tmp_path, case):
    text, needle = BAD[case]
    p = tmp_path / "bad.toml"
    p.write_text(text)
    code, out, err = _run(capsys, "run", str(p), "-q")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("kvmmu: error:"), err
    assert needle in err


def test_missing_scenario_file(capsys, tmp_path):
    code, out, err = _run(capsys, "run", str(tmp_path / "nope.toml"))
    assert code == 2 and err.count("\n") == 1 and "no such file" in err


def test_bad_command_line_is_one_line_too(capsys):
    assert main(["compare"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_bad_policy_list(capsys, tiny):
    code, out, err = _run(capsys, "compare", tiny, "--policies", "off,fast")
    assert code == 2 and "'fast'" in err and err.count("\n") == 1


def test_bad_cost_file(capsys, tiny, tmp_path):
    cf = tmp_path / "c.toml"
    cf.write_text("vm_exits = 5\n")
    code, out, err = _run(capsys, "run", tiny, "--cost", str(cf))
    assert code == 2 and "vm_exits" in err


def test_cost_file_changes_the_cycles(capsys, tiny, tmp_path):
    cf = tmp_path / "c.json"
    cf.write_text('{"userspace_exit": 0}')
    _, out, _ = _run(capsys, "run", tiny, "--json", "-q", "--cost", str(cf))
    assert json.loads(out)["vms"][0]["cost"]["userspace (KVM_EXIT_MMIO)"]["cycles"] == 0
