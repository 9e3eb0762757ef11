"""Nested EPT: L2's physical memory is translated by EPT tables L1 keeps in its own memory.

Spec §3.10 and Appendix A row 14: KVM shadows L1's EPT (shadow pages with role.guest_mode), L2
faults arrive as L2 physical addresses, an L2 access whose L1 gpa has no memslot becomes an MMIO
spte in the shadow EPT, the vCPU cache records gva 0 and the L1 gfn, and the cache never matches
while L2 runs, so the fast path goes through the spte.
"""

from __future__ import annotations

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.guest.pagetables import GuestPageTables, vm_writer
from kvmmu.kvm.mmu.page import ROLE_GUEST_MODE

L2_BASE = 16 << 20          # L1 gpa where L2's "physical" memory starts
NGPA_MMIO = 0xFE000000      # L2 physical address of a device L1 passes through
L1_MMIO = 0xD0000000        # ... which is an L1 gpa without a memslot
CR0 = X86_CR0_PG | X86_CR0_PE | X86_CR0_WP


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def _setup(ept_mmio: bool = True):
    vm = kvmmu.VM(mmu="ept")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=64 << 20)
    vm.mmio_handler = lambda e: 0x55
    w, r = vm_writer(vm)
    ept = GuestPageTables("ept4", w, r, pool=0x100000)
    for off in range(0, 16 << 20, 2 << 20):
        ept.map(off, L2_BASE + off, 2 << 20)
    if ept_mmio:
        ept.map(NGPA_MMIO, L1_MMIO)

    def w2(ngpa: int, size: int, value: int) -> None:
        w(L2_BASE + ngpa, size, value)

    def r2(ngpa: int, size: int) -> int:
        return r(L2_BASE + ngpa, size)
    l2 = GuestPageTables("4level", w2, r2, pool=0x200000)
    l2.map(0x400000, 0x300000)
    l2.map(0x401000, NGPA_MMIO)
    l2.map(0x402000, 0x3000000)            # ngpa 48 MiB: L1's EPT does not map it
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE, cr3=0, cr4=X86_CR4_PAE, efer=EFER_LME)
    vcpu.enter_guest_mode(ept.eptp(), cr0=CR0, cr3=l2.cr3, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
    return vm, vcpu, ept


def test_l2_ram_access_lands_in_l1_memory_through_l1_ept() -> None:
    """An L2 store reaches L1 gpa = L1-EPT(ngpa): the 2-D walk through KVM's shadow of L1's EPT."""
    vm, vcpu, _ = _setup()
    assert vcpu.access(0x400008, 8, "write", 0xABCDEF).ok
    assert int.from_bytes(vm.read_phys(L2_BASE + 0x300008, 8), "little") == 0xABCDEF
    vm.audit()


def test_row14_first_l2_mmio_access_creates_mmio_spte_in_shadow_ept() -> None:
    """Row 14: walk L1's EPT; MMIO spte in the shadow EPT; cache stores gva 0 and the L1 gfn."""
    vm, vcpu, _ = _setup()
    vcpu.access(0x400000, 4, "read")       # fault in the L2 tables and data page first
    before = vcpu.stats.snapshot()
    r = vcpu.access(0x401004, 4, "read")
    d = _delta(before, vcpu.stats.snapshot())
    assert (d.get("pf_taken"), d.get("pf_mmio_spte_created"), d.get("pf_emulate"), d.get("mmio_exits")) == \
        (1, 1, 1, 1)
    assert (vcpu.mmio_gva, vcpu.mmio_gfn) == (0, L1_MMIO >> 12)
    assert [(e.phys_addr, e.len) for e in r.mmio_exit_records] == [(L1_MMIO + 4, 4)]
    assert r.value == 0x55
    spte = list(vcpu.mmu.shadow_walk(NGPA_MMIO))[-1][1]
    assert spte & 0x7 == 0b110                                    # an EPT misconfiguration value
    assert all(sp.role & ROLE_GUEST_MODE for sp in vcpu.mmu.roots())
    vm.audit()


def test_row14_cache_never_matches_while_l2_runs() -> None:
    """The second L2 MMIO access is served by the shadow-EPT MMIO spte, never by the vCPU cache."""
    vm, vcpu, _ = _setup()
    vcpu.access(0x401000, 4, "read")
    before, cb = vcpu.stats.snapshot(), vcpu.counters.snapshot()
    vcpu.access(0x401008, 4, "read")
    d, c = _delta(before, vcpu.stats.snapshot()), _delta(cb, vcpu.counters.snapshot())
    assert not {k for k in d if k.startswith("pf_")}
    assert c.get("mmio_fastpath") == 1 and c.get("mmio_cache_hits", 0) == 0
    assert d.get("mmio_exits") == 1


def test_l2_access_l1_ept_does_not_map_exits_to_l1() -> None:
    """A fault whose L1 translation fails is reflected to L1 as an EPT violation (§3.10)."""
    vm, vcpu, _ = _setup()
    r = vcpu.access(0x402000, 4, "write", 1)
    assert r.l1_exit is not None and r.l1_exit.reason == "ept_violation" and r.l1_exit.ngpa == 0x3000000
    assert r.l1_exit.qualification & 0x2                            # a write
    assert not vcpu.mmu_is_nested                                   # L1 runs again


def test_l1_writes_to_its_ept_tables_are_tracked() -> None:
    """L1's EPT tables are shadowed guest tables: L1 writing an upper-level one is emulated and zaps."""
    vm, vcpu, ept = _setup()
    vcpu.access(0x400000, 4, "read")
    vcpu.leave_guest_mode()
    pde = ept.entry_addr(0, 2, create=False)                       # a 2 MiB leaf in L1's EPT PD
    pdpte = ept.entry_addr(0, 3, create=False)
    # L1 runs with paging off here: its stores go straight to its gpa space.
    vcpu.set_sregs(cr0=X86_CR0_PE, cr4=0, efer=0)
    before = vm.stats.snapshot()
    value = int.from_bytes(vm.read_phys(pde, 8), "little")
    assert vcpu.access(pde, 8, "write", value & ~0x7).ok             # unmap ngpa 0..2 MiB
    assert vm.stats["mmu_pte_write"] - before["mmu_pte_write"] >= 1
    assert int.from_bytes(vm.read_phys(pdpte, 8), "little") & 0x7
    vm.audit()
