"""Host profiles: what kind of KVM host runs the guest's machine code.

The MMU model (VM, vCPU, shadow/TDP MMU) is the same everywhere; what differs between hosts is *how
guest instructions reach it*.  A profile is that difference, made explicit:

``"kvm-pvm"`` — the nested kvm_pvm hosts this project runs on (docs/spec/kvm-pvm-host.md):

- CPL0 code never runs on hardware: KVM's instruction emulator executes every instruction
  (``insn_emulation`` counts each decode).  Its accesses use KVM's software walker (A/D bits set
  only by a walk that succeeds; no A bit on a faulting walk), so there is **no TLB at CPL0**: a PTE
  edit is seen by the very next access, INVLPG or not.  Emulated writes to guest RAM go through
  ``kvm_mmu_track_write`` (``mmu_pte_write``) and MMIO leaves as KVM_EXIT_MMIO without any #PF
  (``pf_*`` stay 0 at CPL0).  kvm_pvm emulates up to ``pvm_emul_batch`` = 1024 instructions per
  entry: ``exits`` counts one per entry — an entry ends at its first exit to userspace (MMIO, HLT),
  when an exception is queued, at a return to CPL3, or after 1024 instructions.  IRETQ is an
  emulation failure (``insn_emulation_fail`` + 1: KVM's emulator has no long-mode IRET) that
  kvm_pvm finishes inside the entry.  Further MMIO exits made while KVM completes an
  instruction (the 2nd fragment, the write of a read-modify-write, the next iteration of a REP
  read) do not enter the guest and are not counted.
- CPL3 64-bit code runs natively under KVM's **shadow MMU with mmio_caching=N**: every MMIO access
  is a #PF exit that takes the full fault path and is emulated; the rest of that instruction is then
  done by the emulator (a REP string instruction continues in the emulator after an MMIO read, and
  returns to the guest without advancing RIP after each MMIO write, so the next iteration faults
  again); an instruction KVM must emulate (the #PF on RDI of a CMPS) runs in the emulator from its
  start, in the emulator's operand order.  A #GP at CPL3 is intercepted and the instruction
  emulated first (``insn_emulation``), which lets an access straddle the canonical boundary; a #UD
  is decoded first (``insn_emulation``) except ``ud2``; other exceptions are a plain exit.
- Exceptions are delivered by KVM in software: IDT, GDT, TSS and the frame on the stack are
  accessed through the software walker (A/D bits set), the frame writes are not tracked writes.
  A fault while delivering any exception becomes #DF (benign ones too), a failed delivery costs no
  exit (a triple fault is one KVM_EXIT_SHUTDOWN), and a frame that would land on MMIO fails the
  delivery.  Every CPL3 access to PML4 slot 256 is a #PF of the host's own (docs/real-kvm.md).
- Guest MAXPHYADDR and 1 GiB pages: whatever CPUID the VMM installs.  The real backend installs
  KVM_GET_SUPPORTED_CPUID (the host's width: 48 bits on some of these machines, 46 on others; no
  Page1GB), so the profile reads both at run time (``kvmmu.real.host_guest_paging``) instead of
  assuming one machine's value.  32-bit/PAE paging is refused (the runtime is 64-bit only).
- Not modelled (quirks of §6 that the runtime avoids): CS/DS selectors read at CPL3, RFLAGS.IF at
  CPL3 (the runtime starts CPL3 code with IF=1), PIO at CPL3, int n / int3 at CPL0, vmcall,
  SYSCALL at CPL3, and the host's own interrupts (timer ticks add ``exits`` on the real host; the
  differential runner takes the minimum over repeated real runs).

``"svm-npt-tdp"`` / ``"svm-npt-legacy"`` / ``"svm-shadow"`` (and ``-nommio``) — KVM 6.1 on SVM
as the nested lab runs it (``kvmmu lab``); see ``profiles_svm``.

``"vmx-ept"`` / ``"vmx-shadow"`` — a plain KVM host with VMX: every ring runs natively (TLB and all),
EPT (today's MMIO caching) or shadow paging; the CPU delivers exceptions itself with implicit
supervisor accesses.  These profiles are the model's prediction only: no such host is at hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import InvalidArgument
from ..hw.host import Host
from .cpu_bus import ModelBus, NativeBus, PvmBus
from .soft_emulator import Emulator
from .vm import VM

if TYPE_CHECKING:
    from .vcpu import Vcpu


@dataclass(frozen=True)
class HostProfile:
    """A KVM host, as far as a guest can tell: one record per host (see the module docstring); each
    field is one fact of that host, and the VM and CPU bus are built from the fields alone."""

    name: str
    summary: str
    mmu: str                       # VM(mmu=...): "shadow" (ept=0 / npt=0), "ept" or "npt"
    mmio_caching: str              # VM(mmio_caching=...): "generation" (enable_mmio_caching) or "off"
    cpl0: str                      # "native" (hardware, TLB) or "emulated" (KVM's emulator, no TLB)
    delivery: str                  # "hardware" or "kvm" (exceptions delivered by KVM in software)
    # How guest code reaches KVM (kvm.cpu_bus): NativeBus when every ring runs on the CPU, PvmBus for
    # kvm_pvm's emulated CPL0 (it must go with cpl0="emulated"), profiles_svm.SvmTcgBus for TCG's SVM.
    bus: type[ModelBus] = NativeBus
    emul_batch: int | None = None  # kvm_pvm.pvm_emul_batch: instructions per emulation entry
    # KVM's emulator has no long-mode IRET (em_iret handles real mode only): IRETQ at CPL0 counts
    # insn_emulation_fail, which kvm_pvm then finishes itself (measured).
    iret_fails_emulation: bool = False
    # kvm_pvm intercepts a #GP at CPL3 and emulates the instruction before reflecting it (measured:
    # insn_emulation + 1), which also lets an access straddle the canonical boundary.
    gp_at_cpl3_emulated: bool = False
    # An emulation failure (e.g. an instruction fetch from MMIO) exits to userspace at every CPL, not
    # only at CPL0 as upstream's handle_emulation_failure does (measured: fetch_from_mmio_cpl3).
    emulation_failure_exits: bool = False
    # kvm_pvm (measured): every CPL3 access to PML4 slot 256 (0xffff800000000000-0xffff807fffffffff)
    # is a #PF, whatever the guest's tables say, without pf_taken; its P and RSVD bits vary from
    # run to run (0x4 or 0xd for a read), W, U and I/D follow the access.
    user_slot256_faults: bool = False
    # kvm_pvm (measured): a fault while delivering any exception — a benign #UD or #BP included —
    # becomes #DF; the SDM delivers the second exception when the first is benign (Vol. 3A 6.15).
    delivery_fault_is_df: bool = False
    # None: what the real backend's CPUID gives a guest on the machine running the model
    guest_maxphyaddr: int | None = 46
    guest_gbpages: bool | None = True
    # The CMPS forms, as (prefix, size), for which the CPU reads DS:[RSI] before ES:[RDI] (the SDM
    # names no order; CPUs differ); None: measured on the machine running the model (realdiff/cmps_order).
    cmps_source_first: frozenset[tuple[str, int]] | None = frozenset()
    quirks: tuple[str, ...] = field(default_factory=tuple)
    # A profile is a real KVM host, so it keeps KVM's guest-visible departures from the SDM.
    kvm_deviations: bool = True
    # VM(pku=...): None is upstream KVM's rule (no PKU with shadow paging, so CR4.PKE is reserved).
    pku: bool | None = None
    # KVM's tdp_mmu module parameter, VM(tdp_mmu=...); None: the VM's default (shadow paging has none).
    tdp_mmu: bool | None = None
    # VM(retry_pf_emulation=...): retry_instruction as kernels before 6.12 run it, for every
    # RET_PF_EMULATE fault and not only a write-protected gfn's (kvm/emulate_retry.py).
    retry_pf_emulation: bool = False
    # The smallest host page behind guest RAM, as a level (1: 4 KiB; 2: L1 runs THP "always", so
    # every 2 MiB frame wholly inside a mapping becomes a huge page); make_vm takes the larger one.
    min_host_hugepage_level: int = 1
    # Host(huge_zero_wp=...): what a write to THP's huge zero page does ("thp": a huge page of its
    # own; "split": Linux 6.1 splits it and faults in a 4 KiB page).
    host_huge_zero_wp: str = "thp"
    # Host(anon_offset=...): where the VMM's anonymous mappings start within a 2 MiB frame (None:
    # 2 MiB aligned, as Linux 6.7+ aligns large anonymous mappings).
    host_anon_offset: int | None = None

    def __post_init__(self) -> None:
        if (self.cpl0 == "emulated") != issubclass(self.bus, PvmBus):
            raise InvalidArgument("bus", self.bus.__name__, f"cpl0={self.cpl0!r}: an emulated CPL0 is "
                                  "PvmBus's (kvm_pvm), a native one any other bus's")

    def guest_paging(self) -> tuple[int, bool]:
        """(guest MAXPHYADDR, 1 GiB pages) of this profile's guests, measured where it says None."""
        width, gb = self.guest_maxphyaddr, self.guest_gbpages
        if width is None or gb is None:
            from ..real.cpuid import host_guest_paging
            host_width, host_gb, _source = host_guest_paging()
            width = host_width if width is None else width
            gb = host_gb if gb is None else gb
        return width, gb

    def cmps_source_first_forms(self) -> frozenset[tuple[str, int]]:
        """The CMPS forms this host's CPU reads source first (measured where the profile says None)."""
        if self.cmps_source_first is None:
            # Measuring needs a guest program on /dev/kvm, which only the layer above can run:
            # realdiff's ModelBackend resolves the profile (`replace(..., cmps_source_first=...)`)
            # before it builds the VM.  Unresolved: ES:[RDI] first, as plain CMPS on every CPU.
            return frozenset()
        return self.cmps_source_first

    def make_vm(self, host_hugepage_level: int = 1) -> VM:
        """A VM of this host; `host_hugepage_level` says how large the host pages behind guest RAM are."""
        width, gb = self.guest_paging()
        # A real host's VMM gets lazily allocated anonymous memory (the zero page for reads).
        host = Host(prealloc=False, huge_zero_wp=self.host_huge_zero_wp, anon_offset=self.host_anon_offset)
        return VM(mmu=self.mmu, mmio_caching=self.mmio_caching, guest_maxphyaddr=width,
                  guest_gbpages=gb, kvm_deviations=self.kvm_deviations,
                  host_hugepage_level=max(self.min_host_hugepage_level, host_hugepage_level), host=host,
                  pku=self.pku, tdp_mmu=self.tdp_mmu, retry_pf_emulation=self.retry_pf_emulation)

    def make_bus(self, vcpu: Vcpu) -> ModelBus:
        return self.bus(self, vcpu)


PROFILES: dict[str, HostProfile] = {
    "kvm-pvm": HostProfile(
        name="kvm-pvm",
        summary="nested kvm_pvm host: CPL0 in KVM's emulator (no TLB), CPL3 native on shadow paging, "
                "mmio_caching=N",
        mmu="shadow", mmio_caching="off", cpl0="emulated", delivery="kvm", bus=PvmBus, emul_batch=1024,
        iret_fails_emulation=True, gp_at_cpl3_emulated=True, guest_maxphyaddr=None, guest_gbpages=None,
        cmps_source_first=None,
        emulation_failure_exits=True, user_slot256_faults=True, delivery_fault_is_df=True,
        # Measured: KVM_SET_SREGS accepts CR4.PKE although this host's KVM reports no PKU
        # (docs/real-kvm.md); PKRU stays 0 there (the host CPU has no PKU), so no key ever denies.
        pku=True,
        quirks=(
            "32-bit and PAE paging refused (shutdown / #GP on MOV CR0)",
            "no A bit on a walk that ends in a fault (KVM's software walker at every ring)",
            "CPL0 has no TLB; CPL3 sees shadow-spte staleness for host-side PTE edits",
            "int3 / int n / icebp and many SSE/AVX instructions at CPL0 are emulation failures",
            "vmcall/vmmcall at CPL0 spin inside KVM_RUN",
            "CPL3: CS/DS read as host selectors, RFLAGS.IF reads 1, PIO exits, SYSCALL stays at CPL3",
            "CR4.SMEP/SMAP/PKE accepted without CPUID; LA57/PCIDE rejected",
            "KVM_TRANSLATE sets A bits and reports writeable=1/usermode=0",
            "IRETQ in the emulator counts insn_emulation_fail (kvm_pvm finishes it in the same entry)",
            "pvm_emul_batch=1024 instructions per emulation entry (exits)",
            "an emulation failure at CPL3 (fetch from MMIO) exits with KVM_EXIT_INTERNAL_ERROR",
            "every CPL3 access to PML4 slot 256 (0xffff800000000000..) is a #PF (P/RSVD bits unstable)",
            "a fault while delivering any exception (benign ones too) becomes #DF",
            "an exception frame that KVM would write to MMIO fails the delivery (KVM_EXIT_SHUTDOWN)",
            "an emulation entry ends when an exception is queued and at a return to CPL3, not at IRETQ",
        )),
    "vmx-ept": HostProfile(
        name="vmx-ept", summary="plain KVM on VMX with EPT and today's MMIO caching; every ring native",
        mmu="ept", mmio_caching="generation", cpl0="native", delivery="hardware"),
    "vmx-shadow": HostProfile(
        name="vmx-shadow", summary="plain KVM on VMX with ept=0 (shadow paging) and today's MMIO caching",
        mmu="shadow", mmio_caching="generation", cpl0="native", delivery="hardware"),
}


def get_profile(name: str | HostProfile) -> HostProfile:
    if isinstance(name, HostProfile):
        return name
    if name not in PROFILES:
        raise InvalidArgument("profile", name, f"host profiles are {sorted(PROFILES)}")
    return PROFILES[name]


# KVM on AMD SVM in the nested lab (QEMU TCG): svm-npt-tdp, svm-npt-legacy, svm-shadow (+ -nommio);
# the module adds them to PROFILES (it builds on HostProfile above, hence the import down here).
from . import profiles_svm  # noqa: E402, F401

__all__ = ["PROFILES", "Emulator", "HostProfile", "ModelBus", "NativeBus", "PvmBus", "get_profile"]
