"""What the modelled CPU reads while the guest runs: the model's VMCS.

Hardware knows nothing of KVM's objects: it reads the VMCS that KVM made current (VMPTRLD) and
filled.  The model keeps that split with two protocols, defined here so that `hw/` imports nothing
from `kvm/`:

- `GuestRegisters`, the guest-state area: registers the guest changes without an exit (RFLAGS.AC,
  CR3 under EPT/NPT, PKRU), read at each access.
- `PagingState`, what KVM writes for the CPU's translation (`vmx_load_mmu_pgd`, the PDPTRs of
  `ept_load_pdptrs`, the control registers as the CPU sees them): the root of KVM's tables, its
  depth, the PDPTRs, and the paging contexts of KVM's tables (`hw_ctx`, shadow paging) and of the
  guest's own (`cpu_role` for permissions, `hw_guest_ctx` for the walk, EPT/NPT).

KVM loads both into a vCPU's CPU with `load_vmcs` when it creates the vCPU and whenever it switches
the MMU context the vCPU runs on (entering and leaving L2: vmcs01 / vmcs02).  `TdpControls` are the
VM-execution controls of a two-dimensional CPU, fixed for the VM's life.  A CPU returns what
happened as a value (hw/cpu.py's VM_EXIT, GUEST_FAULT, GP_FAULT) and never calls KVM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..arch.modes import PagingContext


class GuestRegisters(Protocol):
    cr3: int
    rflags: int
    pkru: int

    @property
    def ac(self) -> bool: ...          # RFLAGS.AC


class PagingState(Protocol):
    root_hpa: int                      # EPT pointer / nCR3, or the shadow root as the CPU's CR3
    root_level: int
    hw_ctx: PagingContext | None       # KVM's shadow tables as the CPU walks them (shadow paging)
    cpu_role: PagingContext | None     # the guest's paging context: permissions (EPT/NPT)
    hw_guest_ctx: PagingContext | None  # the guest's tables as the CPU walks them (EPT/NPT)

    @property
    def pdptrs(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class TdpControls:
    """Secondary controls of a two-dimensional CPU: EPT (else NPT), the TDP table depth, and whether
    EPT accessed/dirty bits are enabled (the EPTP's bit 6)."""
    ept: bool
    level: int
    ept_ad: bool


__all__ = ["GuestRegisters", "PagingState", "TdpControls"]
