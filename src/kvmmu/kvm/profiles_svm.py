"""Host profiles for KVM on AMD SVM as the nested lab runs it (``kvmmu lab``, docs/real-kvm.md).

A stock KVM (``kvm_amd``) in L1 of a QEMU TCG machine: every ring of the guest runs "natively" (on
TCG's emulated CPU, with its TLB), exceptions are delivered by the CPU, MMIO caching is on unless a
``-nommio`` profile says otherwise.  Three MMU set-ups:

- ``svm-npt-tdp``    npt=1 tdp_mmu=1: nested paging on the TDP MMU (KVM's default)
- ``svm-npt-legacy`` npt=1 tdp_mmu=0: nested paging on the legacy shadow-page MMU
- ``svm-shadow``     npt=0: shadow paging

What TCG's SVM does differently from an AMD CPU is part of these profiles, not of the programs
(measured in the lab):

- No NRIPS and no decode assists (``kvm_amd.nrips`` reads 0): to skip an intercepted HLT KVM decodes
  it (``svm_skip_emulated_instruction`` -> ``kvm_emulate_instruction(EMULTYPE_SKIP)``), and an
  intercepted MOV CR or INVLPG is emulated (``cr_interception`` / ``invlpg_interception`` fall back
  to the emulator): one more ``insn_emulation`` for each.
- RF: TCG never sets it itself, neither in the frame of a fault it delivers without KVM (a #GP at
  CPL3, a #PF under NPT) nor in the RFLAGS saved on a fault-class #VMEXIT (seen after
  KVM_EXIT_INTERNAL_ERROR on an instruction fetch from MMIO); a fault KVM injects keeps the RF KVM
  sets before injecting it.  And TCG clears RF only where its translation block ends: RF restored
  by an IRETQ stays set through the straight-line code after it (up to a control transfer or HLT),
  so a fault there pushes RF=1.
- The CPU's TLB is flushed on every VMRUN and #VMEXIT (QEMU's SVM flushes its softmmu TLB), so a
  guest never sees a stale translation across an exit.
- A #PF that TCG's page walk raises for a reserved bit has RSVD without P in its error code (under
  NPT the guest's own #PF: 0x8 for a read at CPL0, 0xe for a write at CPL3; under shadow paging KVM
  injects it, with P).

The kernel is 6.1, so the VM retries an instruction before emulating it as KVM did before 6.12
(`VM(retry_pf_emulation=True)`, kvm/emulate_retry.py).
- A read-modify-write without LOCK is a load and then a store (a hardware CPU translates its read
  for writing): on a page whose gpte is clean the load gets a read-only spte and the store faults
  once more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iced_x86 import FlowControl, Mnemonic

from ..arch.bits import (
    PF_VECTOR,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    X86_CR0_CD,
    X86_CR0_NW,
    X86_CR0_PG,
    X86_CR0_WP,
    X86_EFLAGS_RF,
)
from ..hw.x86cpu import CpuFault, Stop
from .cpu_bus import NativeBus
from .profiles import PROFILES, HostProfile

if TYPE_CHECKING:
    from ..hw.x86cpu import X86Cpu
    from .vcpu import Vcpu

# QEMU's TCG: the qemu64 CPU's 40 physical-address bits (KVM_GET_SUPPORTED_CPUID in L1 passes them on);
# 1 GiB pages are offered to the guest only under shadow paging (measured in L1).
TCG_MAXPHYADDR = 40
# Where the lab VMM's guest-RAM mappings start within a 2 MiB frame.  L1 runs Debian's 6.1 kernel:
# transparent huge pages "always", anonymous mappings aligned only to 4 KiB (see Host).  The address is
# what ASLR gave the job and is not recorded; the recorded runs fit any start from 4 KiB to about
# 1.4 MiB past a boundary (npt-legacy.json: mmio64's code page alone in the partial first frame, its
# data page prefetched with 7 neighbours), so the middle of that range.
L1_ANON_OFFSET = 0x80000


class SvmTcgBus(NativeBus):
    """SVM as QEMU's TCG emulates it (see the module docstring)."""

    def __init__(self, profile: HostProfile, vcpu: Vcpu) -> None:
        super().__init__(profile, vcpu)
        self._exits_seen = -1
        self._rf = 0

    def begin(self, cpu: X86Cpu) -> None:
        exits = self.stats["exits"]
        if exits != self._exits_seen:
            self.vcpu.cpu.flush()        # a VMRUN after an exit starts with an empty TLB
            self._exits_seen = exits
        self._rf = cpu.rflags & X86_EFLAGS_RF
        super().begin(cpu)

    def commit(self, cpu: X86Cpu) -> None:
        # TCG clears RF only where a translation block ends (a control transfer), not after every
        # instruction: RF from an IRETQ stays through the straight-line code after it.
        if self._rf and cpu.instr is not None and cpu.instr.flow_control == FlowControl.NEXT:
            cpu.rflags |= X86_EFLAGS_RF
        super().commit(cpu)

    def deliver_begin(self, cpu: X86Cpu, vector: int) -> None:
        # KVM sets RF when it queues a fault-class exception (inject_pending_event, for a pending
        # one), and the frame TCG pushes keeps it; an exception TCG raises by itself has RF clear in
        # its frame, also when exits came before it in the same instruction (the NPF of its fetch,
        # measured: cr0_wp_toggle_cpl3) or during its delivery (KVM re-injects such an event as it
        # was: slot_readd_readonly_cpl3).
        if not (self.kvm_fault or self.emulating):
            cpu.rflags = (cpu.rflags & ~X86_EFLAGS_RF) | self._rf   # pushed as TCG has it
        super().deliver_begin(cpu, vector)

    def read(self, gva: int, size: int, cpl: int, implicit: bool = False, rmw: bool = False,
             restart: bool = False) -> int:
        # TCG runs a read-modify-write as a load, then a store, each filling its own TLB entry: the
        # load faults as a read (a clean gpte gets a read-only spte), the store faults again.  Only
        # its atomic forms (a LOCK prefix, XCHG with memory) look the page up for writing first.
        instr = self.cpu.instr if self.cpu is not None else None
        if rmw and instr is not None and not (instr.has_lock_prefix or instr.mnemonic == Mnemonic.XCHG):
            rmw = False
        return super().read(gva, size, cpl, implicit, rmw, restart)

    def _hw(self, gva: int, size: int, kind: str, value: int | None, cpl: int, implicit: bool,
            restart: bool = False) -> int:
        before = self.stats["exits"]
        rf = self.cpu.rflags & X86_EFLAGS_RF if self.cpu is not None else 0
        try:
            return super()._hw(gva, size, kind, value, cpl, implicit, restart)
        except CpuFault as fault:
            if fault.vector == PF_VECTOR and not self.kvm_fault and fault.error_code is not None \
                    and fault.error_code & PFERR_RSVD_MASK:
                # TCG's page walk reports a reserved bit without P (measured under NPT, where TCG
                # raises the guest's #PF: 0x8/0xa/0xc/0xe; under shadow paging KVM injects 0x9...)
                fault.error_code &= ~PFERR_PRESENT_MASK
            raise
        except Stop as stop:
            if stop.reason == "internal_error" and self.cpu is not None and not rf:
                self.cpu.rflags &= ~X86_EFLAGS_RF    # TCG saves RFLAGS without RF on a fault-class exit
            raise
        finally:
            if self.stats["exits"] != before:
                # The exit flushed the TLB before the access was retried; what the retry cached stays.
                self._flush_keeping(gva, size)
                self._exits_seen = self.stats["exits"]

    def _flush_keeping(self, gva: int, size: int) -> None:
        cpu = self.vcpu.cpu
        pages = {gva >> 12, ((gva + size - 1) & ((1 << 64) - 1)) >> 12}
        kept = {vpn: cpu.tlb[vpn] for vpn in pages if vpn in cpu.tlb}
        cpu.flush()
        cpu.tlb.update(kept)

    def _emulated_if_exited(self, before: int) -> None:
        if self.stats["exits"] != before:
            self.stats["insn_emulation"] += 1     # no decode assists: KVM emulates the instruction

    def write_cr(self, cpu: X86Cpu, cr: int, value: int) -> None:
        before = self.stats["exits"]
        super().write_cr(cpu, cr, value)
        self._emulated_if_exited(before)

    def read_cr(self, cpu: X86Cpu, cr: int) -> None:
        # KVM's init_vmcb intercepts reads of CR0, CR3 and CR4; with npt=1 it clears the CR3 one, and
        # update_cr0_intercept clears the CR0 one while the CR0 the CPU runs with (shadow paging
        # forces PG and WP; CD and NW are cleared) equals the guest's.  No decode assists: emulated.
        if cr == 4 or (self.profile.mmu == "shadow" and (cr == 3 or (cr == 0 and _cr0_differs(cpu.cr0)))):
            self.stats["exits"] += 1
            self.stats["insn_emulation"] += 1

    def invlpg(self, cpu: X86Cpu, gva: int) -> None:
        before = self.stats["exits"]
        super().invlpg(cpu, gva)
        self._emulated_if_exited(before)

    def halt(self, cpu: X86Cpu) -> None:
        self.stats["insn_emulation"] += 1         # no NRIPS: the HLT is decoded to be skipped
        cpu.rflags &= ~X86_EFLAGS_RF              # HLT ends TCG's translation block
        super().halt(cpu)


def _cr0_differs(cr0: int) -> bool:
    """The shadow-paging CR0 (svm_set_cr0: PG and WP set, CD and NW clear) differs from the guest's."""
    return (cr0 & (X86_CR0_PG | X86_CR0_WP)) != (X86_CR0_PG | X86_CR0_WP) or bool(cr0 & (X86_CR0_CD | X86_CR0_NW))


_QUIRKS = (
    "no NRIPS / decode assists: +1 insn_emulation per intercepted HLT, MOV to/from CR, INVLPG",
    "RF never set by the CPU (frames of its own faults, RFLAGS saved on a fault-class #VMEXIT)",
    "RF from IRETQ kept until a control transfer or HLT",
    "TLB flushed on every VMRUN and #VMEXIT",
    "a reserved-bit #PF raised by TCG has RSVD without P",
    "a read-modify-write without LOCK loads, then stores (two faults on a clean page)",
)


def _profile(name: str, mmu: str, caching: bool, summary: str) -> HostProfile:
    # L1's memory management is Linux 6.1's with THP "always": guest RAM is lazily allocated, every
    # 2 MiB frame wholly inside a mapping becomes one huge page on its first write (the huge zero page
    # on a read), a write to the huge zero page splits it, and mappings are not 2 MiB aligned.
    return HostProfile(name=name if caching else f"{name}-nommio",
                       summary=summary + ("" if caching else ", mmio_caching=0"),
                       mmu=mmu, mmio_caching="generation" if caching else "off", cpl0="native",
                       delivery="hardware", bus=SvmTcgBus, guest_maxphyaddr=TCG_MAXPHYADDR,
                       guest_gbpages=mmu == "shadow", quirks=_QUIRKS,
                       tdp_mmu=name == "svm-npt-tdp" if mmu != "shadow" else None, retry_pf_emulation=True,
                       min_host_hugepage_level=2, host_huge_zero_wp="split", host_anon_offset=L1_ANON_OFFSET)


SVM_PROFILES: dict[str, HostProfile] = {
    p.name: p for caching in (True, False) for p in (
        _profile("svm-npt-tdp", "npt", caching, "KVM 6.1 kvm_amd npt=1 tdp_mmu=1 in QEMU TCG (the lab)"),
        _profile("svm-npt-legacy", "npt", caching, "KVM 6.1 kvm_amd npt=1 tdp_mmu=0 in QEMU TCG (the lab)"),
        _profile("svm-shadow", "shadow", caching, "KVM 6.1 kvm_amd npt=0 (shadow paging) in QEMU TCG (the lab)"),
    )
}

PROFILES.update(SVM_PROFILES)

__all__ = ["SVM_PROFILES", "SvmTcgBus", "TCG_MAXPHYADDR"]
