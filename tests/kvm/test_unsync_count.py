"""mmu_unsync stays exact when guest tables reach one table by several paths (issue 15, F8/F9).

KVM collects the unsync pages below a root once each (mmu_pages_add drops a page already in the
vector), whatever number of parent sptes lead to it: guest tables that map one page table twice or
map themselves, and an L1 EPT that maps its own tables into L2.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE

EPT_WB = 6 << 3


def _raw_vm(mmu: str) -> tuple[kvmmu.VM, object]:
    vm = kvmmu.VM(mmu=mmu)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=1 << 20)

    def w(gpa: int, value: int, size: int = 8) -> None:
        vm.write_phys(gpa, value.to_bytes(size, "little"))
    return vm, w


def test_f8_a_page_table_mapped_by_two_pdes_and_itself() -> None:
    """PD[0] and PD[1] both point at PT 0x4000, whose entry 0 maps the PT itself: a store through it
    unsyncs the PT; the next CR3 load syncs it once (mmu_unsync was -1 before the fix)."""
    vm, w = _raw_vm("shadow")
    w(0x1000, 0x2000 | 7), w(0x2000, 0x3000 | 7), w(0x3000, 0x4000 | 7), w(0x3008, 0x4000 | 7)
    w(0x4000, 0x4000 | 7), w(0x4008, 0x5000 | 7)
    v = vm.create_vcpu()
    v.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr3=0x1000, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
    v.access(0x1000, 4, "read"), v.access(0x201000, 4, "read")
    v.access(0x10, 8, "write", 0x6000 | 7)
    assert vm.stats["mmu_unsync"] == 1
    v.write_cr3(0x1000)
    v.access(0x1000, 4, "read")
    assert vm.stats["mmu_unsync"] == 0
    vm.audit()


def test_f9_l1_ept_maps_its_own_ept_table_into_l2() -> None:
    """Nested EPT: two EPT PDEs share EPT PT 0x4000 and its entry 0 maps it into L2; an L2 store to it
    unsyncs the shadow-EPT page, and a guest TLB flush syncs it once."""
    vm, w = _raw_vm("ept")
    w(0x1000, 0x2000 | 7), w(0x2000, 0x3000 | 7), w(0x3000, 0x4000 | 7), w(0x3008, 0x4000 | 7)
    w(0x4000, 0x4000 | 7 | EPT_WB), w(0x4008, 0x5000 | 7 | EPT_WB)
    v = vm.create_vcpu()
    v.set_sregs(cr0=X86_CR0_PE, cr3=0, cr4=0, efer=0)
    v.enter_guest_mode(0x1000 | 0x18 | 6, cr0=X86_CR0_PE, cr3=0, cr4=0, efer=0)
    v.access(0x1000, 4, "read"), v.access(0x201000, 4, "read")
    v.access(0x10, 8, "write", 0x6000 | 7 | EPT_WB)
    assert vm.stats["mmu_unsync"] == 1
    v.requests.add("KVM_REQ_TLB_FLUSH_GUEST")     # what nested VM entry requests on a TLB-flushing VMRESUME
    v.access(0x1000, 4, "read")
    assert vm.stats["mmu_unsync"] == 0
    vm.audit()


# Random guest tables over a pool of 4 pages (gpa 0x1000-0x4000): every entry points into the pool,
# so tables alias each other, map themselves and loop.  Mostly present, writable, small pages.
_ENTRY = st.tuples(st.integers(1, 4), st.sampled_from([7, 7, 7, 3, 5, 1, 0]),
                   st.sampled_from([False, False, False, True]))                # target page, low bits, PS
_TABLES = st.dictionaries(st.tuples(st.integers(1, 4), st.integers(0, 3)), _ENTRY, max_size=16)
_OPS = st.lists(st.tuples(st.sampled_from(["read", "write", "cr3", "invlpg", "flush"]), st.integers(0, 15),
                          st.integers(0, 3)), min_size=1, max_size=30)


def _fill(w: object, tables: dict, ept: bool, esize: int) -> None:
    for (page, index), (target, low, ps) in tables.items():
        value = (target << 12) | low | (0x80 if ps else 0) | (EPT_WB if ept else 0)
        w(page * 0x1000 + index * esize, value, esize)  # type: ignore[operator]


def _gva(sel: int, index: int, bits: int, levels: int) -> int:
    """An address whose table indexes at the lowest `levels` levels are in 0..3 (the entries drawn)."""
    gva = 0
    for level in range(levels):
        gva |= (((sel >> level) & 1) * index % 4) << (12 + bits * level)
    return gva


@settings(max_examples=100, deadline=None)
@given(mode=st.sampled_from(["4level", "32bit", "nested"]), tables=_TABLES, ops=_OPS)
def test_unsync_count_holds_for_any_aliased_or_self_mapped_tables(mode: str, tables: dict, ops: list) -> None:
    """Property: with arbitrary guest tables (shadow paging 4-level or 32-bit, or an L1 EPT under nested
    EPT), guest accesses, CR3 loads, INVLPG and guest TLB flushes keep vm.audit() clean, mmu_unsync
    included; every access ends in a result."""
    vm, w = _raw_vm("ept" if mode == "nested" else "shadow")
    v = vm.create_vcpu()
    esize, bits = (4, 10) if mode == "32bit" else (8, 9)
    _fill(w, tables, mode == "nested", esize)
    if mode == "nested":
        v.set_sregs(cr0=X86_CR0_PE, cr3=0, cr4=0, efer=0)
        v.enter_guest_mode(0x1000 | 0x18 | 6, cr0=X86_CR0_PE, cr3=0, cr4=0, efer=0)
    elif mode == "32bit":
        v.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr3=0x1000, cr4=0x10, efer=0)
    else:
        v.set_sregs(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr3=0x1000, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
    vm.mmio_handler = lambda e: 0
    for op, sel, index in ops:
        # L2 runs with paging off: a 32-bit ngpa reaches L1's EPT PDPT entries 0..3 at most.
        gva = _gva(sel, index, bits, {"32bit": 2, "nested": 3}.get(mode, 4)) | (8 * index)
        if op in ("read", "write"):
            r = v.access(gva, 4, op, (sel << 12 | 7) if op == "write" else None)
            assert r.fault is not None or r.l1_exit is not None or r.value is not None or op == "write"
        elif op == "cr3" and mode != "nested":
            v.write_cr3(0x1000 * (1 + sel % 4))
        elif op == "invlpg" and mode != "nested":
            v.invlpg(gva)
        elif op == "flush":
            v.requests.add("KVM_REQ_TLB_FLUSH_GUEST")
        vm.audit()
