"""Workloads on the modelled OS: the counts follow from KVM's rules for where each access goes."""

import pytest

import kvmmu
from kvmmu.guest.os import GuestOS, OsParams
from kvmmu.guest.workloads import make_workload
from kvmmu.vmm import Machine, MachineSpec
from kvmmu.vmm.runner import HostRunner


def run(kind, params, mmu="shadow", policy="generation", vcpus=1, seconds=0.2, **spec):
    host = kvmmu.Host()
    m = Machine(MachineSpec(ram_mib=64, vcpus=vcpus, mmu=mmu, mmio_caching=policy, **spec), host)
    os_ = GuestOS(m, OsParams(boot_console_bytes=0, hz=100))
    os_.boot()
    w = make_workload(kind, params)
    w.setup(os_)
    before = dict(os_.counters)
    stats = HostRunner(host, [os_]).run(int(seconds * 2.5e9))
    delta = {k: os_.counters[k] - before[k] for k in before}
    m.vm.audit()
    return m, os_, w, delta, stats


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_mmio_bench_caches_after_the_first_access(mmu):
    """With MMIO sptes, only the first access to the register takes the full fault path; every write
    to a userspace device is one KVM_EXIT_MMIO (4 bytes <= 8)."""
    n = 300
    m, os_, w, d, st = run("mmio-bench", {"iterations": n}, mmu)
    assert w.result(os_)["iterations"] == n and st.stopped_by == "workload done"
    assert d["mmio_slow_path"] == 1
    assert d["mmio_fast_path"] == n - 1
    assert m.testdev_user.writes == n
    assert d["mmio_to_userspace"] == n


def test_mmio_bench_without_caching_always_takes_the_full_path():
    n = 100
    m, os_, w, d, st = run("mmio-bench", {"iterations": n}, "shadow", "off")
    assert d["mmio_slow_path"] == n and d["mmio_fast_path"] == 0


def test_mmio_bench_ioeventfd_completes_in_the_kernel():
    n = 100
    m, os_, w, d, st = run("mmio-bench", {"iterations": n, "target": "ioeventfd"})
    assert d["mmio_to_userspace"] == 0 and m.testdev_kernel.writes == n


def test_mmio_bench_refuses_an_ioeventfd_read():
    with pytest.raises(kvmmu.InvalidArgument, match="access"):
        make_workload("mmio-bench", {"target": "ioeventfd", "access": "read"})


def test_netperf_e1000_is_five_userspace_mmio_per_transaction():
    """TDT write on send; ICR read, IMC write, RDT write, IMS write in the interrupt; the EOI goes to
    the in-kernel LAPIC."""
    t = 20
    m, os_, w, d, st = run("netperf-rr", {"transactions": t, "rtt_us": 30.0}, nic="e1000", msix=False)
    assert w.result(os_)["transactions"] == t
    assert d["net_requests"] == t
    assert d["mmio_to_userspace"] == 5 * t
    assert m.lapic.eois >= t


def test_netperf_virtio_with_ioeventfd_and_msix_never_leaves_the_kernel():
    t = 20
    m, os_, w, d, st = run("netperf-rr", {"transactions": t, "rtt_us": 30.0})
    assert d["net_requests"] == t and d["mmio_to_userspace"] == 0
    assert m.net_notify.kicks == t


def test_kernel_compile_runs_its_jobs_to_the_end():
    m, os_, w, d, st = run("kernel-compile", {"total_jobs": 3, "jobs": 2, "heap_pages": 8, "compute_ms": 1.0,
                                              "text_pages": 8, "header_pages": 4}, vcpus=2, seconds=2.0)
    assert w.result(os_) == {"jobs_finished": 3, "jobs_started": 3}
    assert d["forks"] == 3 and d["execs"] == 3 and st.stopped_by == "workload done"
    assert d["page_faults"] > 3 * 8 and d["context_switches"] > 0


def test_memslot_churn_generation_makes_mmio_sptes_stale_zap_drops_everything():
    """2011: creating a memslot zaps every shadow page; today: it bumps the generation, so existing MMIO
    sptes fail check_mmio_spte once (mmio_fastpath_invalid) and nothing is zapped for the creation."""
    params = {"iterations": 60, "actions": "hotplug", "period_us": 300.0, "display_hz": 0}
    m_gen, *_ = run("memslot-churn", params, "shadow", "generation")
    m_zap, *_ = run("memslot-churn", params, "shadow", "zap")
    stale_gen = sum(v.counters["mmio_fastpath_invalid"] for v in m_gen.vcpus)
    stale_zap = sum(v.counters["mmio_fastpath_invalid"] for v in m_zap.vcpus)
    assert stale_gen > 0 and stale_zap == 0
    assert m_zap.vm.stats["mmu_shadow_zapped"] > m_gen.vm.stats["mmu_shadow_zapped"]


def test_unknown_workload_parameter_is_named():
    with pytest.raises(kvmmu.InvalidArgument, match="jobz"):
        make_workload("kernel-compile", {"jobz": 3})
    with pytest.raises(kvmmu.InvalidArgument, match="workload.kind"):
        make_workload("bitcoin", {})


def test_memslot_churn_hotplugs_more_than_the_vmm_address_space_over_time():
    """Issue 15 F10: 64 GiB hot-plugged and removed 24 times (1.5 TiB in all, more than the VMM's 1 TiB
    address space) runs, because each removal unmaps the slot's memory."""
    params = {"actions": "hotplug", "hotplug_mib": 64 << 10, "period_us": 100.0, "display_hz": 0}
    m, _os, w, *_ = run("memslot-churn", params, "shadow", "generation", seconds=0.005)
    assert w.changes >= 48
