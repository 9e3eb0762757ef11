"""Shadow-MMU machinery that scenario tests rarely reach: the page quota, several vCPUs sharing one
MMU, trace events, and vm.audit() catching corruption.  Rules from docs/spec/kvm-mmu.md §2.2, §3.11, §4.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.guest.pagetables import RW, US, GuestPageTables, P, vm_writer

CR0 = X86_CR0_PG | X86_CR0_PE | X86_CR0_WP


def _vm(**kw: object) -> tuple[kvmmu.VM, GuestPageTables]:
    vm = kvmmu.VM(**kw)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=256 << 20)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=0x100000)
    return vm, pt


def _vcpu(vm: kvmmu.VM, pt: GuestPageTables) -> kvmmu.Vcpu:
    v = vm.create_vcpu()
    v.set_sregs(cr0=CR0, cr3=pt.cr3, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
    return v


def test_quota_recycles_the_oldest_pages() -> None:
    """With a small quota, KVM zaps the oldest shadow pages before allocating (mmu_recycled)."""
    vm, pt = _vm(max_mmu_pages=64)           # KVM_MIN_ALLOC_MMU_PAGES
    for i in range(100):                     # 100 page tables: one per 2 MiB region
        pt.map(0x40000000 + (i << 21), 0x1000000 + (i << 12))
    vcpu = _vcpu(vm, pt)
    for i in range(100):
        assert vcpu.access(0x40000000 + (i << 21), 8, "write", i).ok
    assert vm.stats["mmu_recycled"] > 0
    assert vm.mmu.n_used_mmu_pages <= 64
    for i in range(100):                      # the guest still sees its memory
        assert vcpu.access(0x40000000 + (i << 21), 8, "read").value == i
    vm.audit()


def test_zapping_flushes_every_vcpu_tlb() -> None:
    """A zap is followed by a remote TLB flush: each vCPU processes KVM_REQ_TLB_FLUSH (tlb_flush+1)."""
    vm, pt = _vm()
    pt.map(0x400000, 0x200000)
    a, b = _vcpu(vm, pt), _vcpu(vm, pt)
    a.access(0x400000, 4, "read")
    b.access(0x400000, 4, "read")
    before = (a.stats["tlb_flush"], b.stats["tlb_flush"], vm.stats["remote_tlb_flush"])
    vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 30, memory_size=1 << 20)
    vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 30, memory_size=0)     # delete: zap all
    a.access(0x400000, 4, "read")
    b.access(0x400000, 4, "read")
    assert vm.stats["remote_tlb_flush"] > before[2]
    assert a.stats["tlb_flush"] > before[0] and b.stats["tlb_flush"] > before[1]


def test_vcpus_share_shadow_pages_but_not_tlbs() -> None:
    """Shadow pages are per VM (found in the gfn hash by the second vCPU); TLBs are per vCPU."""
    vm, pt = _vm()
    pt.map(0x400000, 0x200000)
    a, b = _vcpu(vm, pt), _vcpu(vm, pt)
    a.access(0x400000, 4, "read")
    misses = vm.stats["mmu_cache_miss"]
    b.access(0x400000, 4, "read")
    assert vm.stats["mmu_cache_miss"] == misses            # b reused a's pages
    assert 0x400 in a.cpu.tlb and 0x400 in b.cpu.tlb
    a.invlpg(0x400000)
    assert 0x400 not in a.cpu.tlb and 0x400 in b.cpu.tlb


def test_trace_subscribers_see_kvm_tracepoint_names() -> None:
    """Events are named after KVM's tracepoints and reach subscribers in order."""
    vm, pt = _vm()
    pt.map(0x400000, 0x200000)
    pt.map(0x401000, 0xD0000000)
    seen: list[str] = []
    vm.trace.subscribe(lambda ev: seen.append(ev.name))
    v = _vcpu(vm, pt)
    v.access(0x400000, 4, "read")
    v.access(0x401000, 4, "read")
    v.access(0x402000 - 0x1000, 4, "read")
    for name in ("kvm_page_fault", "kvm_mmu_pagetable_walk", "kvm_mmu_get_page", "kvm_mmu_set_spte",
                 "mark_mmio_spte", "kvm_mmio"):
        assert name in seen, name
    assert "handle_mmio_page_fault" in seen or "vcpu_match_mmio" in seen


def test_trace_buffer_is_bounded() -> None:
    vm, pt = _vm()
    pt.map(0x400000, 0x200000)
    vm.trace.enable(capacity=10)
    v = _vcpu(vm, pt)
    for _ in range(20):
        v.access(0x400000, 4, "read")
        v.invlpg(0x400000)
    assert len(vm.trace.events) == 10 and vm.trace.dropped > 0


@pytest.mark.parametrize("corruption", ["writable", "rmap", "gauge", "frame", "parent"])
def test_audit_catches_corruption(corruption: str) -> None:
    """vm.audit() names the broken invariant: a leaf granting more than the guest's entry, an rmap
    that lost the leaf, a wrong pages_4k, a leaf pointing at the neighbouring host frame, a table
    that forgot the parent spte linking it (KVM's sp->parent_ptes)."""
    vm, pt = _vm()
    pt.map(0x400000, 0x200000, flags=P | US)             # read-only for the guest
    v = _vcpu(vm, pt)
    v.access(0x400000, 4, "read")
    vm.audit()
    level, sptep = list(v.mmu.shadow_walk_ptrs(0x400000))[-1]
    if corruption == "writable":
        vm.host.mem.write(sptep, 8, vm.host.mem.read(sptep, 8) | 2)
        match = "more than"
    elif corruption == "rmap":
        vm.mmu.rmap.clear()
        match = "rmap"
    elif corruption == "frame":
        vm.host.mem.write(sptep, 8, vm.host.mem.read(sptep, 8) ^ (1 << 12))
        match = "not gfn"
    elif corruption == "parent":
        _, pde = list(v.mmu.shadow_walk_ptrs(0x400000))[-2]
        vm.mmu.pages_by_pfn[(vm.host.mem.read(pde, 8) >> 12) & ((1 << 40) - 1)].parent_ptes.discard(pde)
        match = "lacks the parent pointer"
    else:
        vm.stats["pages_4k"] += 1
        match = "pages_4k"
    with pytest.raises(kvmmu.AuditError, match=match):
        vm.audit()


def test_guest_large_page_is_mapped_by_direct_shadow_pages() -> None:
    """A guest 2 MiB page is shadowed by a direct level-1 page whose role carries the guest's access;
    two mappings of the same frame with different rights get different shadow pages (access.c
    corrupt_hugepage_trigger)."""
    vm, pt = _vm()
    pt.map(0x40000000, 0x1000000, 2 << 20, P | RW)
    pt.map(0x80000000, 0x1000000, 2 << 20, P)
    v = _vcpu(vm, pt)
    assert v.access(0x40000000, 4, "read").ok and v.access(0x80000000, 4, "read").ok
    assert v.access(0x40000000, 4, "write", 1).ok
    r = v.access(0x80000000, 4, "write", 2)
    assert r.fault is not None and r.fault.error_code == 0x3
    direct = [sp for sp in vm.mmu.active_mmu_pages if sp.direct and sp.gfn == 0x1000]
    assert len(direct) == 2 and len({(sp.role >> 8) & 7 for sp in direct}) == 2
    vm.audit()
