"""The TDP MMU: counter deltas and tracepoints as KVM's tdp_mmu.c moves them (each test cites the
function), against the legacy MMU (`tdp_mmu=False`) where the two differ.

The guests run with paging off (gva == gpa), so each RAM page the guest touches is one NPT/EPT fault.
"Measured" marks the facts of the real Debian 6.1 KVM in docs/tdp-mmu.md.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import X86_CR0_PE
from kvmmu.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES

G = 0xD000_0000                     # no memslot here
MiB = 1 << 20


def _vm(flavour: str = "npt", tdp_mmu: bool = True, **kw: object) -> tuple[kvmmu.VM, kvmmu.Vcpu]:
    vm = kvmmu.VM(mmu=flavour, tdp_mmu=tdp_mmu, **kw)  # type: ignore[arg-type]
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 * MiB)
    vm.mmio_handler = lambda e: 0x1234
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PE)
    vm.trace.enable()
    return vm, vcpu


def _touch(vcpu: kvmmu.Vcpu, pages: range | list[int], kind: str = "read") -> None:
    for gfn in pages:
        vcpu.access(gfn << 12, 8, kind, *([gfn] if kind == "write" else []))


@pytest.mark.parametrize("flavour", ["ept", "npt"])
def test_each_fault_maps_exactly_one_page_with_its_tables(flavour: str) -> None:
    """kvm_tdp_mmu_map: tables are linked on the way down (tdp_mmu_link_sp), then one leaf; there is no
    prefetch.  Eight pages of one 2 MiB region: 3 tables (PDPT, PD, PT) below the root and 8 leaves,
    pf_fixed 8, pages_4k 8 (handle_changed_spte -> kvm_update_page_stats).  The legacy MMU maps the
    8-entry block at the first fault (direct_pte_prefetch): pf_fixed 1 for the same 8 pages."""
    vm, vcpu = _vm(flavour)
    _touch(vcpu, range(0x100, 0x108))
    assert (vcpu.stats["pf_fixed"], vm.stats["pages_4k"], vm.mmu.tdp_mmu.pages) == (8, 8, 4)   # root + 3 tables
    links = [e for e in vm.trace.events if e.name == "kvm_tdp_mmu_spte_changed" and e.fields["level"] > 1]
    assert [e.fields["level"] for e in links] == [4, 3, 2]          # installed once, on the first fault
    assert vm.trace.names().count("kvm_mmu_spte_requested") == 8
    vm.audit()
    legacy, lv = _vm(flavour, tdp_mmu=False)
    _touch(lv, range(0x100, 0x108))
    assert (lv.stats["pf_fixed"], legacy.stats["pages_4k"]) == (1, 8)


def test_tdp_mmu_pages_are_outside_the_shadow_mmus_accounting() -> None:
    """tdp_mmu_alloc_sp / tdp_account_mmu_page: no kvm_mmu_find_shadow_page (mmu_cache_miss stays 0),
    no n_used_mmu_pages, so the page quota (make_mmu_pages_available, not called on the TDP MMU fault
    path) never recycles them; the legacy MMU counts a cache miss per new page and recycles."""
    vm, vcpu = _vm(max_mmu_pages=64)
    _touch(vcpu, [gfn << 9 for gfn in range(8)])          # 8 different 2 MiB regions: 8 PTs
    _touch(vcpu, [(1 << 18) * i for i in range(1, 4)])   # three more GiBs: PDs and PTs
    assert vm.stats["mmu_cache_miss"] == 0 and vm.mmu.n_used_mmu_pages == 0 and vm.stats["mmu_recycled"] == 0
    assert vm.mmu.tdp_mmu.pages == 1 + 1 + 4 + 11                   # root, PDPT, 4 PDs, 11 PTs
    legacy, lv = _vm(tdp_mmu=False, max_mmu_pages=64)
    _touch(lv, [gfn << 9 for gfn in range(8)])
    assert legacy.stats["mmu_cache_miss"] == legacy.mmu.n_used_mmu_pages == 1 + 1 + 1 + 8


def test_zap_all_fast_invalidates_roots_and_counts_no_shadow_zap() -> None:
    """kvm_mmu_zap_all_fast with the TDP MMU (a memslot deletion): kvm_tdp_mmu_invalidate_all_roots marks
    the root invalid, kvm_tdp_mmu_zap_invalidated_roots zaps it before the ioctl returns (pages_4k
    back to 0, every table freed) and mmu_shadow_zapped does not move (measured: it stays 0 under
    the TDP MMU).  The vCPU's next entry loads a new root.  The legacy MMU counts every page."""
    vm, vcpu = _vm()
    vm.set_user_memory_region(slot=1, guest_phys_addr=64 * MiB, memory_size=MiB)
    _touch(vcpu, [0x100, 0x101, (64 * MiB) >> 12])
    old_root = vcpu.mmu.root_sp
    vm.set_user_memory_region(slot=1, guest_phys_addr=64 * MiB, memory_size=0)      # delete
    assert vm.trace.names().count("kvm_mmu_zap_all_fast") == 1
    assert (vm.stats["mmu_shadow_zapped"], vm.stats["pages_4k"]) == (0, 0)
    assert old_root.invalid and vm.mmu.tdp_mmu.roots == [old_root]       # the vCPU still holds it
    assert vm.mmu.tdp_mmu.pages == 1
    vm.audit()
    _touch(vcpu, [0x100])
    assert vcpu.mmu.root_sp is not old_root and vm.mmu.tdp_mmu.roots == [vcpu.mmu.root_sp]
    assert vm.mmu.tdp_mmu.pages == 4 and vm.stats["pages_4k"] == 1
    legacy, lv = _vm(tdp_mmu=False)
    legacy.set_user_memory_region(slot=1, guest_phys_addr=64 * MiB, memory_size=MiB)
    _touch(lv, [0x100, 0x101, (64 * MiB) >> 12])
    legacy.set_user_memory_region(slot=1, guest_phys_addr=64 * MiB, memory_size=0)
    assert legacy.stats["mmu_shadow_zapped"] == 5      # root, PDPT, the first GiB's PD, the PTs of 0 and 64 MiB


def test_roots_are_shared_by_role_and_outlive_their_vcpus() -> None:
    """kvm_tdp_mmu_get_vcpu_root_hpa: a new root has two references (the vCPU's and the TDP MMU's own),
    a second vCPU with the same role takes a third.  A context reset (kvm_mmu_unload ->
    kvm_tdp_mmu_put_root) drops only the vCPU's: the root stays, and the next entry finds it by role,
    so nothing faults again (measured on the lab's 6.1: a CR0.WP toggle rebuilt no table)."""
    vm, v0 = _vm()
    v1 = vm.create_vcpu()
    v1.set_sregs(cr0=X86_CR0_PE)
    _touch(v0, [0x100])
    _touch(v1, [0x101])
    root = v0.mmu.root_sp
    assert v1.mmu.root_sp is root and root.root_count == 3 and vm.stats["pages_4k"] == 2
    v0.set_sregs(cr0=X86_CR0_PE)                           # kvm_mmu_reset_context -> kvm_mmu_unload
    v1.set_sregs(cr0=X86_CR0_PE)
    assert root.root_count == 1 and not root.invalid and vm.stats["pages_4k"] == 2
    vm.audit()
    taken = v0.stats["pf_taken"]
    _touch(v0, [0x100, 0x101])
    assert v0.mmu.root_sp is root and root.root_count == 2 and v0.stats["pf_taken"] == taken
    assert vm.stats["mmu_shadow_zapped"] == 0 and vm.mmu.tdp_mmu.roots == [root]


def test_mmio_spte_at_4k_with_the_generation_and_kvms_access_field() -> None:
    """tdp_mmu_map_handle_target_level: no slot -> make_mmio_spte(ACC_ALL) at the goal level, which is
    4 KiB for a no-slot pfn even on a host with 1 GiB pages (kvm_mmu_hugepage_adjust returns for
    is_error_noslot_pfn); pf_mmio_spte_created +1 and trace_mark_mmio_spte, whose `access` is
    `spte & ACC_ALL`: 7 on NPT (W|U from ACC_ALL plus the present bit of the MMIO value)."""
    vm, vcpu = _vm("npt", host_hugepage_level=3)
    vcpu.access(G, 4, "read")
    marks = [e for e in vm.trace.events if e.name == "mark_mmio_spte"]
    assert len(marks) == 1 and vcpu.stats["pf_mmio_spte_created"] == 1
    gen = vm.memslots.generation(0)
    assert marks[0].fields == {"sptep": marks[0].fields["sptep"], "gfn": G >> 12, "access": 7, "gen": gen}
    walk = vm.mmu.tdp_mmu.get_walk(vcpu.mmu, G)
    assert walk[-1][0] == 1 and walk[-1][1] == (1 << 51) | G | 0x7 | (gen << 3)
    vm.audit()


def test_slot_created_makes_the_mmio_spte_stale_once() -> None:
    """Measured: a memslot created between runs makes the next access take one full fault, with one
    check_mmio_spte line `spte 80000d0000017 kvm_gen 4 spte-gen 2 valid 0`, and one new MMIO spte with
    generation 4 (two address spaces: each update adds 2 to the generation)."""
    vm, vcpu = _vm()
    vcpu.access(G, 4, "read")
    vcpu.access(G, 4, "read")
    vm.set_user_memory_region(slot=1, guest_phys_addr=64 * MiB, memory_size=MiB)
    vm.trace.clear()
    taken = vcpu.stats["pf_taken"]
    vcpu.access(G, 4, "read")
    checks = [e.fields for e in vm.trace.events if e.name == "check_mmio_spte"]
    assert checks == [{"spte": 0x80000D0000017, "kvm_gen": 4, "spte_gen": 2}]
    assert [e.fields["gen"] for e in vm.trace.events if e.name == "mark_mmio_spte"] == [4]
    assert vcpu.stats["pf_taken"] == taken + 1


def _toggle_until_wrap(toggles: int, initial_generation: int) -> tuple[kvmmu.VM, int]:
    vm, vcpu = _vm(initial_generation=initial_generation)
    vm.set_user_memory_region(slot=1, guest_phys_addr=64 * MiB, memory_size=0x1000)
    vcpu.access(G, 4, "read")
    vm.trace.enable(capacity=64)
    zaps = []
    vm.trace.subscribe(lambda e: zaps.append(e) if e.name == "kvm_mmu_zap_all_fast" else None)
    for i in range(toggles):
        vm.set_user_memory_region(slot=1, guest_phys_addr=64 * MiB, memory_size=0x1000,
                                  flags=KVM_MEM_LOG_DIRTY_PAGES if i % 2 == 0 else 0)
    assert vm.stats["mmu_shadow_zapped"] == 0 and vm.stats["pages_4k"] == 0
    vm.audit()
    return vm, len(zaps)


@pytest.mark.full
def test_generation_wraparound_zaps_all_exactly_once() -> None:
    """Measured: 2^18 memslot flag toggles from a fresh VM (generation +2 each, so the 19-bit field of
    the MMIO spte wraps once) make KVM zap everything exactly once (kvm_mmu_invalidate_mmio_sptes ->
    kvm_mmu_zap_all_fast).  (About a minute: `make test-full`.)"""
    _, zaps = _toggle_until_wrap(1 << 18, 0)
    assert zaps == 1


def test_generation_wraparound_near_the_wrap() -> None:
    """The same wrap from a VM whose generation starts 8 updates (of +2) before it: the two slot
    creations and the first 5 toggles stay below 2^19, the 6th wraps (zap all once), the next 102 do not."""
    vm, zaps = _toggle_until_wrap(108, (1 << 19) - 16)
    assert zaps == 1 and vm.memslots.generation(0) == (1 << 19) - 16 + 2 * 110


def test_mmu_notifier_unmap_and_aging() -> None:
    """kvm_tdp_mmu_unmap_gfn_range (tdp_mmu_zap_leafs) drops the leaf of a swapped-out page (pages_4k -1,
    tables stay); kvm_tdp_mmu_age_gfn_range clears the accessed bit and reports the page young once."""
    from kvmmu.kvm.mmu_notifier import kvm_age_hva
    vm, vcpu = _vm()
    _touch(vcpu, [0x100, 0x101])
    hva = vm.memslots.spaces[0].search(0x100).gfn_to_hva(0x100)
    assert kvm_age_hva(vm, hva) is True and kvm_age_hva(vm, hva) is False
    vm.host.swap_out_pages([hva >> 12])
    assert vm.stats["pages_4k"] == 1 and vm.mmu.tdp_mmu.pages == 4
    vm.audit()
    taken = vcpu.stats["pf_taken"]
    _touch(vcpu, [0x100])
    assert vcpu.stats["pf_taken"] == taken + 1 and vm.stats["pages_4k"] == 2


def test_dirty_logging_write_protects_and_fast_page_fault_restores() -> None:
    """Enabling KVM_MEM_LOG_DIRTY_PAGES: kvm_tdp_mmu_wrprot_slot clears W (MMU-writable stays); the next
    write is fixed by fast_page_fault without the MMU lock (pf_fast +1, pf_fixed +1) and dirties the
    page; KVM_GET_DIRTY_LOG re-protects it (kvm_tdp_mmu_clear_dirty_pt_masked, no PML)."""
    vm, vcpu = _vm()
    vm.set_user_memory_region(slot=1, guest_phys_addr=64 * MiB, memory_size=MiB)
    base = (64 * MiB) >> 12
    _touch(vcpu, [base, base + 1], "write")
    vm.set_user_memory_region(slot=1, guest_phys_addr=64 * MiB, memory_size=MiB, flags=KVM_MEM_LOG_DIRTY_PAGES)
    fast, fixed = vcpu.stats["pf_fast"], vcpu.stats["pf_fixed"]
    _touch(vcpu, [base + 1], "write")
    assert (vcpu.stats["pf_fast"] - fast, vcpu.stats["pf_fixed"] - fixed) == (1, 1)
    vm.audit()
    assert vm.get_dirty_log(1) == {1}
    _touch(vcpu, [base + 1], "write")
    assert vcpu.stats["pf_fast"] - fast == 2 and vm.get_dirty_log(1) == {1}
    vm.audit()


def test_huge_page_split_when_dirty_logging() -> None:
    """kvm_mmu_hugepage_adjust maps a 2 MiB page where slot and host allow (pages_2m +1); with dirty
    logging on, fast_page_fault leaves the write-protected huge spte alone, the level drops to 4 KiB
    and kvm_tdp_mmu_map zaps the huge spte (pages_2m -1), links a table and maps one 4 KiB page."""
    vm, vcpu = _vm(host_hugepage_level=2)
    vm.set_user_memory_region(slot=1, guest_phys_addr=64 * MiB, memory_size=2 * MiB)
    base = (64 * MiB) >> 12
    _touch(vcpu, [base + 5], "write")
    assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (1, 0)
    vm.set_user_memory_region(slot=1, guest_phys_addr=64 * MiB, memory_size=2 * MiB, flags=KVM_MEM_LOG_DIRTY_PAGES)
    fast = vcpu.stats["pf_fast"]
    _touch(vcpu, [base + 7], "write")
    assert (vm.stats["pages_2m"], vm.stats["pages_4k"], vcpu.stats["pf_fast"]) == (0, 1, fast)
    assert vm.get_dirty_log(1) == {7}
    vm.audit()
