"""A TLB entry under EPT/NPT holds the rights of both translation stages combined (issue 15, F7).

SDM Vol. 3C 29.4.2 ("combined mappings"): with EPT the processor caches linear-address translations
whose rights are those of the guest paging structures AND those of the EPT paging structures; an
access the EPT rights do not allow is an EPT violation even when the linear translation is cached.
Under nested EPT KVM's shadow EPT holds L1's EPT rights (never more), so an L2 access that L1's EPT
forbids must reach L1 as an EPT violation, whatever L2 did before with the same page.  The exit
qualification (SDM Vol. 3C 28.2.1, table "Exit Qualification for EPT Violations"): bit 0 read,
bit 1 write, bit 2 fetch; bits 3-5 whether the translation was readable, writable, executable.

The property test draws L1 EPT rights per page and a sequence of L2 accesses, and compares each
outcome with a reference that knows nothing but those two rules.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.guest.pagetables import EPT_R, EPT_W, EPT_WB, EPT_X, RW, US, GuestPageTables, P, vm_writer

L2_BASE = 16 << 20               # L1 gpa of L2 physical address 0
PAGES = 4
GVA = 0x40_0000                  # L2 linear address of page 0 (page i at GVA + i * 4 KiB)
NGPA = 0x30_0000                 # L2 physical address of page 0
CR0 = X86_CR0_PG | X86_CR0_PE | X86_CR0_WP
RIGHTS = {"r": EPT_R, "rw": EPT_R | EPT_W, "rx": EPT_R | EPT_X, "rwx": EPT_R | EPT_W | EPT_X}
QUAL_KIND = {"read": 1, "write": 2, "fetch": 4}


class Nested:
    """L1 (an EPT VM) runs L2; L1's EPT maps L2's RAM RWX except the test pages, which get `rights`."""

    def __init__(self, rights: list[int]) -> None:
        self.vm = vm = kvmmu.VM(mmu="ept")
        vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=32 << 20)
        w, r = vm_writer(vm)
        self.ept = GuestPageTables("ept4", w, r, pool=0x10_0000)
        for off in range(0, 4 << 20, 0x1000):
            self.ept.map(off, L2_BASE + off, flags=EPT_R | EPT_W | EPT_X | EPT_WB)
        for i, bits in enumerate(rights):
            self.ept.map(NGPA + 0x1000 * i, L2_BASE + NGPA + 0x1000 * i, flags=bits | EPT_WB)

        def w2(ngpa: int, size: int, value: int) -> None:
            w(L2_BASE + ngpa, size, value)

        def r2(ngpa: int, size: int) -> int:
            return r(L2_BASE + ngpa, size)

        self.l2 = GuestPageTables("4level", w2, r2, pool=0x20_0000)
        for i in range(PAGES):
            self.l2.map(GVA + 0x1000 * i, NGPA + 0x1000 * i, flags=P | RW | US)   # L2 allows everything
        self.vcpu = vm.create_vcpu()
        self.vcpu.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE, cr3=0, cr4=X86_CR4_PAE, efer=EFER_LME)
        self.enter()

    def enter(self) -> None:
        self.vcpu.enter_guest_mode(self.ept.eptp(), cr0=CR0, cr3=self.l2.cr3, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)

    def access(self, page: int, kind: str, cpl: int) -> kvmmu.AccessResult:
        r = self.vcpu.access(GVA + 0x1000 * page, 4 if kind != "fetch" else 1, kind, 1 if kind == "write" else None,
                             cpl=cpl)
        if r.l1_exit is not None:
            self.enter()                     # L1 handles the exit (here: ignores it) and resumes L2
        return r


def _violation(r: kvmmu.AccessResult, page: int, kind: str, bits: int) -> None:
    assert r.fault is None and r.l1_exit is not None, f"{kind} of page {page} ({bits:03b}): expected an EPT violation"
    assert r.l1_exit.reason == "ept_violation" and r.l1_exit.ngpa == NGPA + 0x1000 * page
    readable, writable, executable = bits & EPT_R, bits & EPT_W, bits & EPT_X
    qual = QUAL_KIND[kind] | (8 if readable else 0) | (16 if writable else 0) | (32 if executable else 0)
    assert r.l1_exit.qualification & 0x3F == qual


def test_l2_fetch_after_read_of_an_l1_read_only_page_exits_to_l1() -> None:
    """The issue's case: L1's EPT maps the page R (no X); an L2 read, then an L2 fetch."""
    n = Nested([EPT_R])
    assert n.access(0, "read", 0).ok
    _violation(n.access(0, "fetch", 0), 0, "fetch", EPT_R)
    n.vm.audit()


@pytest.mark.parametrize("first", ["read", "fetch"])
def test_l2_write_to_an_l1_read_only_page_exits_to_l1(first: str) -> None:
    n = Nested([EPT_R | EPT_X])
    assert n.access(0, first, 3).ok
    _violation(n.access(0, "write", 3), 0, "write", EPT_R | EPT_X)
    assert n.access(0, "read", 3).ok, "the read-only page stays readable"
    n.vm.audit()


def _plain(mmu: str, flags: int) -> tuple[kvmmu.VM, kvmmu.Vcpu]:
    vm = kvmmu.VM(mmu=mmu)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    vm.set_user_memory_region(slot=1, guest_phys_addr=32 << 20, memory_size=0x10000, flags=flags)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=0x10_0000)
    pt.map(GVA, 32 << 20, flags=P | RW | US)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=CR0, cr3=pt.cr3, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
    return vm, vcpu


@pytest.mark.parametrize("mmu", ["ept", "npt"])
def test_plain_tdp_write_after_read_of_a_read_only_slot_exits(mmu: str) -> None:
    """A read-only memslot: KVM's TDP spte has no W, so a write after a cached read still exits and
    becomes KVM_EXIT_MMIO (the slot's memory unchanged); fetches from it run."""
    vm, vcpu = _plain(mmu, kvmmu.KVM_MEM_READONLY)
    vm.mmio_handler = lambda e: None
    assert vcpu.access(GVA, 4, "read").ok and vcpu.access(GVA, 1, "fetch").ok
    r = vcpu.access(GVA, 4, "write", 0x11223344)
    assert r.ok and [(e.phys_addr, e.is_write) for e in r.mmio_exit_records] == [(32 << 20, True)]
    assert vm.read_phys(32 << 20, 4) == b"\0\0\0\0"
    vm.audit()


@pytest.mark.parametrize("mmu", ["ept", "npt"])
def test_plain_tdp_write_after_read_under_dirty_logging_is_logged(mmu: str) -> None:
    """Dirty logging write-protects KVM's TDP sptes: a write after a cached read must exit so the
    page is logged."""
    vm, vcpu = _plain(mmu, kvmmu.KVM_MEM_LOG_DIRTY_PAGES)
    assert vcpu.access(GVA, 4, "read").ok
    vm.get_dirty_log(1)
    assert vcpu.access(GVA + 8, 4, "read").ok
    assert vcpu.access(GVA, 4, "write", 5).ok
    assert vm.get_dirty_log(1) == {0}                # page index 0 of slot 1


# -- the property -----------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rights=st.lists(st.sampled_from(sorted(RIGHTS)), min_size=PAGES, max_size=PAGES),
       ops=st.lists(st.tuples(st.integers(0, PAGES - 1), st.sampled_from(["read", "write", "fetch"]),
                              st.sampled_from([0, 3])), min_size=1, max_size=16))
def test_l2_accesses_get_exactly_l1_ept_rights(rights: list[str], ops: list[tuple[int, str, int]]) -> None:
    """Reference: L2's tables allow everything, so an access runs iff L1's EPT grants its kind
    (read: R, write: W, fetch: X), else it is an EPT violation for L1 — in any order of accesses."""
    bits = [RIGHTS[r] for r in rights]
    n = Nested(bits)
    need = {"read": EPT_R, "write": EPT_W, "fetch": EPT_X}
    for page, kind, cpl in ops:
        r = n.access(page, kind, cpl)
        if bits[page] & need[kind]:
            assert r.ok and r.l1_exit is None, f"{kind} of page {page} ({rights[page]}) at CPL{cpl}: {r}"
        else:
            _violation(r, page, kind, bits[page])
    n.vm.audit()
