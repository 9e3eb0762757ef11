"""The modelled guest OS: boot, demand paging, fork/COW, munmap, determinism.

Expected counts come from the OS's rules (Linux's): a first touch of an anonymous page is one #PF; a
write to a page shared after fork is a COW fault that copies while the frame has two users and
reuses it when it has one; flush_tlb_page is one INVLPG, which KVM intercepts only under shadow
paging; munmap above 33 pages flushes the whole TLB instead of INVLPG per page.
"""

import pytest

import kvmmu
from kvmmu.guest.os import DIRECT_MAP, KERNEL_PGD_SLOTS, USER_HEAP, GuestOS, OsParams
from kvmmu.vmm import Machine, MachineSpec
from kvmmu.vmm.runner import HostRunner


def boot(mmu="shadow", vcpus=1, policy="generation", seed=1):
    host = kvmmu.Host()
    m = Machine(MachineSpec(ram_mib=64, vcpus=vcpus, mmu=mmu, mmio_caching=policy), host)
    os_ = GuestOS(m, OsParams(boot_console_bytes=0), seed=seed)
    os_.boot()
    return host, m, os_


def run(host, os_, seconds=0.05):
    return HostRunner(host, [os_]).run(int(seconds * 2.5e9))


def test_boot_puts_every_vcpu_in_long_mode_on_the_kernel_pgd():
    host, m, os_ = boot(vcpus=2)
    for v in m.vcpus:
        assert v.cr3 == os_.kpgd << 12 and v.efer & (1 << 10)         # EFER.LMA
    for slot in KERNEL_PGD_SLOTS:
        assert m.vm.read_guest_quiet((os_.kpgd << 12) + 8 * slot, 8) & 1


def test_ioremap_maps_the_device_uncached_through_the_guests_own_tables():
    host, m, os_ = boot()
    va = os_.ioremaps["serial"]
    table = os_.kpgd << 12
    for level in (4, 3, 2, 1):
        pte = m.vm.read_guest_quiet(table + 8 * ((va >> (12 + 9 * (level - 1))) & 511), 8)
        assert pte & 1
        table = pte & 0x000FFFFFFFFFF000
    assert table == m.serial.base and pte & 0x10                    # PCD


def test_new_process_pgd_shares_the_kernel_half():
    host, m, os_ = boot()
    mm = os_._new_mm(m.vcpus[0])
    for slot in KERNEL_PGD_SLOTS:
        assert m.vm.read_guest_quiet((mm.pgd << 12) + 8 * slot, 8) == \
            m.vm.read_guest_quiet((os_.kpgd << 12) + 8 * slot, 8)


def _fork_program(n, log):
    def child():
        for i in range(n):
            yield ("access", USER_HEAP + (i << 12), 8, "write", 100 + i)
        yield ("exit",)

    def parent():
        yield ("brk", n)
        for i in range(n):
            yield ("access", USER_HEAP + (i << 12), 8, "write", i)
        yield ("fork", child())
        yield ("wait",)
        for i in range(n):
            yield ("access", USER_HEAP + (i << 12), 8, "write", i)
        log.append((yield ("access", USER_HEAP, 8, "read")))
    return parent()


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_demand_paging_fork_and_copy_on_write(mmu):
    n = 6
    host, m, os_ = boot(mmu)
    log = []
    os_.spawn("init", _fork_program(n, log))
    invlpg_before = m.vcpus[0].stats["invlpg"]
    run(host, os_)
    c = os_.counters
    assert c["forks"] == 1 and c["exits"] == 2
    assert c["cow_faults"] == 2 * n                  # the child copies n pages, then the parent reuses n
    assert c["page_faults"] == 3 * n                 # n demand-zero + 2n COW
    assert c["invlpgs"] == 2 * n
    # KVM intercepts INVLPG under shadow paging only.
    assert m.vcpus[0].stats["invlpg"] - invlpg_before == (2 * n if mmu == "shadow" else 0)
    assert log == [0]                                 # the parent still sees its own data, not the child's
    assert os_.procs == {}
    # PGDs are freed once no CPU has them in CR3: only the last one, still loaded (lazy TLB), remains.
    assert all(mm.dead and mm.loaded_on for mm in os_.mms.values()) and len(os_.mms) <= 1
    m.vm.audit()


def test_kernel_page_table_writes_are_seen_by_shadow_paging():
    """Under shadow paging the kernel's stores into shadowed tables exit to KVM (emulated or unsynced)."""
    host, m, os_ = boot("shadow")
    os_.spawn("init", _fork_program(4, []))
    run(host, os_)
    assert m.vm.stats["mmu_pte_write"] > 0 and m.vcpus[0].stats["pf_emulate"] > 0


@pytest.mark.parametrize("pages, invlpgs, flushes", [(8, 8, 0), (40, 0, 1)])
def test_munmap_invlpg_per_page_up_to_33_then_a_full_flush(pages, invlpgs, flushes):
    host, m, os_ = boot("shadow")

    def prog():
        start = yield ("mmap", pages)
        for i in range(pages):
            yield ("access", start + (i << 12), 8, "write", i)
        yield ("munmap", start, pages)
    os_.spawn("init", prog())
    run(host, os_)
    assert os_.counters["munmaps"] == 1
    assert os_.counters["invlpgs"] == invlpgs
    assert os_.counters["tlb_flushes"] == flushes + 1          # + the flush of exit_mmap


def test_access_outside_every_vma_is_a_segfault():
    host, m, os_ = boot()

    def prog():
        yield ("access", 0x7000_0000, 8, "read")
        yield ("access", USER_HEAP, 8, "read")        # never reached: the process was killed
    os_.spawn("bad", prog())
    run(host, os_)
    assert os_.counters["segfaults"] == 1 and os_.counters["page_faults"] == 1


def test_kernel_direct_map_reaches_all_ram():
    host, m, os_ = boot()
    v = m.vcpus[0]
    last = (64 << 20) - 8
    assert v.access(DIRECT_MAP + last, 8, "read", cpl=0).fault is None


def test_same_seed_same_run_on_several_vcpus():
    from kvmmu.guest.workloads import make_workload

    def once():
        host, m, os_ = boot("shadow", vcpus=2, seed=7)
        make_workload("kernel-compile", {"total_jobs": 3, "jobs": 2, "heap_pages": 8, "compute_ms": 1.0,
                                         "text_pages": 8, "header_pages": 4}).setup(os_)
        r = run(host, os_, 0.5)
        return os_.summary(), {k: v for c in m.vcpus for k, v in c.stats.items()}, r.host_cycles
    assert once() == once()
