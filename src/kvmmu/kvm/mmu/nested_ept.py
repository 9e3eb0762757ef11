"""Nested TDP's two MMU contexts: guest_mmu, which shadows L1's EPT, and nested_mmu, the emulator's.

While L2 runs, vcpu.mmu is guest_mmu: indirect shadow pages with role.guest_mode over L1's EPT, its
faults arriving with an L2 physical address (ngpa).  vcpu.walk_mmu is nested_mmu, never loaded: it
translates an L2 linear address for the emulator through L2's page tables, each table access and the
final address through L1's EPT.  The per-vCPU MMIO cache is never consulted while L2 runs (the
thread of the 2011 seed: a cached L1 gva/gfn says nothing about an L2 address).

Entering and leaving L2, and the VM exit an EPT fault becomes for L1, are kvm/nested.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ...arch.bits import PFERR_FETCH_MASK, PFERR_WRITE_MASK, PT64_ADDR_MASK
from ...arch.modes import PagingContext
from ...arch.walker import Walk, walk
from ...errors import KvmBug
from .context import VcpuMmu
from .gpte import guest_format
from .page import make_role
from .paging import page_fault, paging_gva_to_gpa, sync_spte

if TYPE_CHECKING:
    from ..vcpu import Vcpu
    from .pf import KvmPageFault


def nested_ept_get_eptp(mmu: VcpuMmu) -> int:
    """nested_ept_get_eptp: guest_mmu's tables are rooted at L1's EPTP."""
    eptp: int = mmu.nested_eptp  # type: ignore[attr-defined]  # only ShadowEptMmu has this op
    return eptp


class ShadowEptMmu(VcpuMmu):
    """guest_mmu: an indirect MMU over L1's EPT (kvm_init_shadow_ept_mmu)."""

    def __init__(self, vcpu: Vcpu, eptp: int, inject_page_fault: Callable[[VcpuMmu, int, Walk], None]) -> None:
        super().__init__(vcpu)
        self.nested_eptp = eptp
        # The ops do not depend on L2's registers: assigned once, as nested_ept_init_mmu_context does
        # (the fault a failed walk of L1's EPT becomes is the VMX code's: kvm/nested.py passes it).
        self.page_fault = page_fault
        self.gva_to_gpa = paging_gva_to_gpa
        self.sync_spte = sync_spte
        self.inject_page_fault = inject_page_fault
        self.get_guest_pgd = nested_ept_get_eptp

    def init_context(self) -> None:
        """The EPT role from the EPTP; cpu_role and hw_guest_ctx are L2's paging, which the CPU walks."""
        v = self.vcpu
        vm = self.vm
        eptp = self.nested_eptp
        self.cpu_role = PagingContext.from_regs(v.cr0, v.cr4, v.efer, maxphyaddr=vm.guest_maxphyaddr,
                                                gbpages=vm.guest_gbpages, ad_policy="kvm")
        self.cpu_key = self.cpu_role.key
        levels = ((eptp >> 3) & 7) + 1
        ad = bool(eptp & (1 << 6))
        self.walk_ctx = PagingContext(f"ept{levels}", maxphyaddr=vm.guest_maxphyaddr, ept_ad=ad,
                                      gbpages=vm.guest_gbpages, ad_policy="kvm")
        self.direct = False
        self.root_level = levels
        self.root_role = make_role(levels, direct=False, guest_mode=True, cr0_wp=True, ad_disabled=not ad)
        self.hw_ctx = None
        self.hw_guest_ctx = PagingContext.from_regs(v.cr0, v.cr4, v.efer, maxphyaddr=vm.guest_maxphyaddr,
                                                    gbpages=vm.guest_gbpages, ad_policy="hardware")
        self.gfmt = guest_format(self.walk_ctx)


def _no_page_fault(mmu: VcpuMmu, fault: KvmPageFault) -> int:
    raise KvmBug(f"nested_mmu is never loaded, so no fault ({fault.addr:#x}) is taken on it")


class NestedMmu(VcpuMmu):
    """nested_mmu: L2's paging mode for the emulator's walks (init_kvm_nested_mmu); never loaded."""

    def __init__(self, vcpu: Vcpu) -> None:
        super().__init__(vcpu)
        self.page_fault = _no_page_fault
        self.gva_to_gpa = nested_gva_to_gpa
        self.sync_spte = None

    def init_context(self) -> None:
        v = self.vcpu
        ctx = PagingContext.from_regs(v.cr0, v.cr4, v.efer, maxphyaddr=self.vm.guest_maxphyaddr,
                                      gbpages=self.vm.guest_gbpages, ad_policy="kvm")
        self.cpu_role = self.walk_ctx = ctx
        self.cpu_key = ctx.key
        self.gfmt = guest_format(ctx)


def _l1_ept_walk(guest_mmu: ShadowEptMmu, ngpa: int, access: int) -> Walk:
    """ept_gva_to_gpa's walk of L1's EPT (without the shadow path's tracepoints)."""
    vcpu = guest_mmu.vcpu
    vcpu.counters["guest_walks"] += 1
    return walk(guest_mmu.walk_ctx, vcpu.pte_reader, guest_mmu.nested_eptp, ngpa,
                access & (PFERR_WRITE_MASK | PFERR_FETCH_MASK))


class _L2TableReader:
    """L2's page tables as nested_mmu reads them: each table address through L1's EPT."""

    def __init__(self, guest_mmu: ShadowEptMmu) -> None:
        self.guest_mmu = guest_mmu
        self.reader = guest_mmu.vcpu.pte_reader
        self.failed: tuple[int, Walk] | None = None

    def read_pte(self, ngpa: int, size: int) -> int:
        w = _l1_ept_walk(self.guest_mmu, ngpa, 0)
        if w.fault:
            self.failed = (ngpa, w)
            return -1
        return self.reader.read_pte(w.gpa, size)

    def cmpxchg_pte(self, ngpa: int, size: int, old: int, new: int) -> bool:
        w = _l1_ept_walk(self.guest_mmu, ngpa, PFERR_WRITE_MASK)
        if w.fault:
            self.failed = (ngpa, w)
            return True
        return self.reader.cmpxchg_pte(w.gpa, size, old, new)


def nested_gva_to_gpa(mmu: VcpuMmu, gva: int, access: int) -> int | Walk | None:
    """nested_mmu's gva_to_gpa: L2 gva -> L1 gpa; None when a fault went to L2 (#PF) or to L1 (an EPT
    exit, through guest_mmu's inject_page_fault: translate_nested_gpa's nested_page_fault)."""
    vcpu = mmu.vcpu
    guest_mmu = vcpu.mmu
    if not isinstance(guest_mmu, ShadowEptMmu):
        raise KvmBug("nested_mmu walks only while L2 runs on a shadow of L1's EPT")
    ctx: PagingContext = mmu.cpu_role  # type: ignore[assignment]  # built at nested entry
    if ctx.mode.root_level:
        reader = _L2TableReader(guest_mmu)
        vcpu.counters["guest_walks"] += 1
        w = walk(ctx, reader, vcpu.cr3, gva, access, ac=vcpu.ac, pkru=vcpu.pkru)
        if reader.failed is not None:
            ngpa, failed = reader.failed
            guest_mmu.inject_page_fault(guest_mmu, ngpa, failed)
            return None
        if w.fault:
            vcpu.inject_page_fault(w.error_code, gva)       # nested_mmu's: kvm_inject_page_fault
            return None
        ngpa = w.gpa
    else:
        ngpa = gva
    w2 = _l1_ept_walk(guest_mmu, ngpa, access)
    if w2.fault:
        guest_mmu.inject_page_fault(guest_mmu, ngpa, w2)
        return None
    return w2.gpa & PT64_ADDR_MASK | (ngpa & 0xFFF)


__all__ = ["NestedMmu", "ShadowEptMmu", "nested_ept_get_eptp", "nested_gva_to_gpa"]
