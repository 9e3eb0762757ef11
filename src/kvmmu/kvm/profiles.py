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

import iced_x86 as ix

from ..arch.bits import (
    PF_VECTOR,
    PFERR_FETCH_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    X86_EFLAGS_RF,
)
from ..errors import InvalidArgument
from ..hw.host import Host
from ..hw.x86cpu import GP, UD, CpuFault, Reexecute, Stop, X86Cpu
from .emulate import pieces
from .emulate_retry import page_table_writing_insn
from .soft_emulator import Emulator
from .vm import VM

if TYPE_CHECKING:
    from .vcpu import Vcpu

_UD2 = ix.Mnemonic.UD2
_SLOT256 = 0x1FFFF00          # gva >> 39 of PML4 slot 256 (0xffff800000000000..)
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})


@dataclass(frozen=True)
class HostProfile:
    """A KVM host, as far as a guest can tell: see the module docstring for the three profiles."""

    name: str
    summary: str
    mmu: str                       # VM(mmu=...)
    mmio_caching: str              # VM(mmio_caching=...)
    cpl0: str                      # "native" (hardware, TLB) or "emulated" (KVM's emulator, no TLB)
    delivery: str                  # "hardware" or "kvm" (exceptions delivered by KVM in software)
    emul_batch: int | None = None  # kvm_pvm.pvm_emul_batch: instructions per emulation entry
    iret_fails_emulation: bool = False
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
        return VM(mmu=self.mmu, mmio_caching=self.mmio_caching, guest_maxphyaddr=width,
                  guest_gbpages=gb, kvm_deviations=self.kvm_deviations,
                  host_hugepage_level=host_hugepage_level, host=Host(prealloc=False), pku=self.pku)

    def make_bus(self, vcpu: Vcpu) -> ModelBus:
        return PvmBus(self, vcpu) if self.cpl0 == "emulated" else NativeBus(self, vcpu)


PROFILES: dict[str, HostProfile] = {
    "kvm-pvm": HostProfile(
        name="kvm-pvm",
        summary="nested kvm_pvm host: CPL0 in KVM's emulator (no TLB), CPL3 native on shadow paging, "
                "mmio_caching=N",
        mmu="shadow", mmio_caching="off", cpl0="emulated", delivery="kvm", emul_batch=1024,
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


def _fault(vector: int, error_code: int, cr2: int | None) -> CpuFault:
    return CpuFault(vector, error_code if vector in _ERROR_CODE_VECTORS else None, cr2)


class ModelBus:
    """The CPU's bus on the model: hardware accesses through ``vcpu.access``; once KVM emulated an
    access, the rest of that instruction goes through KVM's emulator (as in x86_emulate_instruction)."""

    def __init__(self, profile: HostProfile, vcpu: Vcpu) -> None:
        self.profile = profile
        self.vcpu = vcpu
        self.stats = vcpu.stats
        self.emu = Emulator(vcpu)
        self.emulating = False         # KVM's emulator is executing the current instruction
        self.delivering = False        # KVM (not the CPU) is delivering an exception
        self.iter_mmio_write = False   # the current string iteration wrote to MMIO (emulated)
        # The exception being raised was queued by KVM (a #PF it injects, one from its emulator, a
        # #UD it reflects), not raised by the CPU itself: SVM's RF quirk and #UD intercept tell.
        self.kvm_fault = False
        self.cpu: X86Cpu | None = None

    # -- instruction boundaries ---------------------------------------------------------------
    def begin(self, cpu: X86Cpu) -> None:
        self.emulating = False
        self.iter_mmio_write = False
        self.kvm_fault = False
        self.vcpu.rflags = cpu.rflags           # EFLAGS.AC for SMAP

    def commit(self, cpu: X86Cpu) -> None:
        pass

    def abort(self, cpu: X86Cpu, fault: CpuFault) -> None:
        pass

    # -- memory ---------------------------------------------------------------------------------
    def _hw(self, gva: int, size: int, kind: str, value: int | None, cpl: int, implicit: bool,
            restart: bool = False) -> int:
        vcpu = self.vcpu
        before = self.stats["insn_emulation"]
        failed = self.stats["insn_emulation_fail"]
        injected = self.stats["pf_guest"]
        vcpu.defer_emulation = restart
        if vcpu.vm.retry_pf_emulation:
            vcpu.emul_insn = self._current_insn(kind, implicit)
        try:
            r = vcpu.access(gva, size, kind, value, cpl=cpl, implicit=implicit)
        finally:
            vcpu.defer_emulation = False
            vcpu.emul_insn = None
        if r.emulate:
            self.emulating = True              # KVM's emulator runs the instruction from its start
            raise Reexecute()
        if r.internal_error is not None or (self.profile.emulation_failure_exits
                                            and self.stats["insn_emulation_fail"] != failed):
            self._userspace_exit()              # KVM_EXIT_INTERNAL_ERROR ends the entry
            if self.cpu is not None and not self.emulating:
                # The CPU took a fault-class VM exit on this instruction: the saved RFLAGS has RF set
                # (SDM Vol. 3C 28.3.3; measured: fetch_from_mmio_cpl3 stops with RFLAGS 0x10202).
                self.cpu.rflags |= X86_EFLAGS_RF
            raise Stop("internal_error", f"KVM could not emulate the {kind} at gva {gva:#x}")
        if r.fault is not None:
            # KVM queued it if it injected a #PF or its emulator ran; a guest #PF under TDP and a
            # non-canonical #GP are the CPU's own.
            self.kvm_fault = self.stats["insn_emulation"] != before or self.stats["pf_guest"] != injected
            raise _fault(r.fault.vector, r.fault.error_code, r.fault.cr2)
        if self.stats["insn_emulation"] != before:
            self.emulating = True          # KVM emulated it; the emulator finishes the instruction
            if kind == "write" and r.mmio_exit_records:
                self.iter_mmio_write = True
        return r.value if r.value is not None else 0

    def _current_insn(self, kind: str, implicit: bool) -> tuple[int, bool] | None:
        """(RIP, PageTable flag) of the instruction whose explicit data access this is, for
        retry_instruction; None for a fetch (not decoded yet) or an access of event delivery."""
        cpu = self.cpu
        if cpu is None or implicit or kind == "fetch" or self.delivering or cpu.instr is None \
                or cpu.instr.ip != cpu.rip:
            return None
        return cpu.rip, page_table_writing_insn(cpu.instr)

    def _in_emulator(self, cpl: int) -> bool:
        return self.emulating or self.delivering

    def fetch(self, gva: int, n: int, cpl: int) -> bytes:
        if self._in_emulator(cpl):
            failed = self.stats["insn_emulation_fail"]
            try:
                return self.emu.fetch(gva, n, cpl)
            except CpuFault as fault:
                if self.stats["insn_emulation_fail"] == failed:
                    raise                       # a #PF of the fetch
                self.kvm_fault = True           # the #UD of handle_emulation_failure
                if not self.profile.emulation_failure_exits:
                    raise
                self._userspace_exit()
                raise Stop("internal_error", f"KVM could not emulate the fetch at gva {gva:#x}") from fault
            except Stop:
                self._userspace_exit()          # KVM_EXIT_INTERNAL_ERROR ends the entry
                raise
        out = bytearray()
        addr = gva
        while len(out) < n:
            left = n - len(out)
            k = 16 if left >= 16 else 8 if left >= 8 else 4 if left >= 4 else 2 if left >= 2 else 1
            out += self._hw(addr, k, "fetch", None, cpl, False).to_bytes(k, "little")
            addr += k
        return bytes(out)

    def read(self, gva: int, size: int, cpl: int, implicit: bool = False, rmw: bool = False,
             restart: bool = False) -> int:
        if restart:
            if self._in_emulator(cpl):
                raise Reexecute()
            return self._hw(gva, size, "read", None, cpl, implicit, restart=True)
        if self._in_emulator(cpl):
            return self.emu.read(gva, size, cpl, implicit, self._userspace_exit)
        # The load of a read-modify-write is translated for writing: it faults with W=1 and KVM maps
        # the page writable (and sets D) before the load; if KVM emulates it, its emulator does the
        # rest of the instruction (x86_emulate_instruction runs it from the start).
        return self._hw(gva, size, "rmw" if rmw else "read", None, cpl, implicit)

    def write(self, gva: int, size: int, value: int, cpl: int, implicit: bool = False) -> None:
        if self._in_emulator(cpl):
            if self.emu.write(gva, size, value, cpl, implicit, tracked=not self.delivering,
                              on_exit=self._userspace_exit, ram_only=self.delivering):
                self.iter_mmio_write = True
            return
        self._hw(gva, size, "write", value, cpl, implicit)

    def _userspace_exit(self) -> None:
        pass

    def rep_yield(self, cpu: X86Cpu) -> bool:
        """KVM's emulator after one REP iteration: re-enter the guest without advancing RIP after an
        MMIO write, or when RCX reaches a multiple of 1024 — zero included, since the emulator tests
        RCX == 0 only when an iteration starts (so the instruction is decoded once more to finish
        it); otherwise it restarts the next iteration (EMULATION_RESTART)."""
        wrote, self.iter_mmio_write = self.iter_mmio_write, False
        if not self.emulating:
            return False
        return wrote or cpu.regs[1] & 0x3FF == 0

    def noncanonical_tail(self, cpu: X86Cpu) -> bool:
        """An access whose first byte is canonical and last is not (a dword at 0x7ffffffffffe): #GP
        per the SDM.  KVM's emulator checks only the first byte (__linearize), then accesses the
        access page by page, so the bytes below the boundary are written and the walk of
        0x800000000000 (PML4 slot 256 of the guest's tables) decides: a #PF there.  With
        kvm_deviations that is what happens where KVM's emulator runs the instruction, and at CPL3
        where the host intercepts the CPU's #GP and emulates the instruction (kvm_pvm)."""
        if not self.vcpu.vm.kvm_deviations:
            return False
        if self._in_emulator(cpu.cpl):
            return True
        if cpu.cpl == 3 and self.profile.gp_at_cpl3_emulated:
            self.stats["exits"] += 1            # the #GP exit; KVM emulates the instruction
            self.stats["insn_emulation"] += 1
            self.emulating = True
            return True
        return False

    # -- privileged operations ------------------------------------------------------------------
    def write_cr(self, cpu: X86Cpu, cr: int, value: int) -> None:
        vcpu = self.vcpu
        fn = {0: vcpu.write_cr0, 3: vcpu.write_cr3, 4: vcpu.write_cr4}[cr]
        try:
            fn(value)
        except InvalidArgument:
            self.kvm_fault = True
            raise CpuFault(GP, 0) from None     # KVM refuses the value (kvm_set_cr4 &c. return 1): #GP

    def read_cr(self, cpu: X86Cpu, cr: int) -> None:
        pass          # the reads a host intercepts are its profile's (SvmTcgBus)

    def cmps_source_first(self, cpu: X86Cpu, prefix: str, size: int) -> bool:
        return (prefix, size) in self.profile.cmps_source_first_forms()

    def soft_int(self, cpu: X86Cpu, vector: int) -> bool:
        return False

    def unemulatable(self, cpu: X86Cpu, what: str) -> None:
        pass

    def invlpg(self, cpu: X86Cpu, gva: int) -> None:
        self.vcpu.invlpg(gva)

    def halt(self, cpu: X86Cpu) -> None:
        self.stats["exits"] += 1
        self.stats["halt_exits"] += 1
        raise Stop("hlt")

    def iret(self, cpu: X86Cpu, new_cpl: int) -> None:
        pass

    def deliver_begin(self, cpu: X86Cpu, vector: int) -> None:
        self.emulating = False
        self.delivering = self.profile.delivery == "kvm"
        self.emu.inject = not self.delivering

    def deliver_end(self, cpu: X86Cpu, vector: int) -> None:
        self.delivering = False
        self.emu.inject = True

    def deliver_failed(self, cpu: X86Cpu, vector: int) -> bool:
        self.delivering = False
        self.emu.inject = True
        if vector == 8:
            self.stats["exits"] += 1          # triple fault: KVM_EXIT_SHUTDOWN
        return self.profile.delivery_fault_is_df


class NativeBus(ModelBus):
    """A VMX host: every ring on hardware; the CPU delivers exceptions with implicit accesses."""

    def abort(self, cpu: X86Cpu, fault: CpuFault) -> None:
        if fault.vector == UD and not self.emulating and not self.kvm_fault:
            # VMX and SVM intercept the CPU's #UD (handle_ud decodes the instruction, then queues
            # #UD); a #UD KVM injects itself (a failed emulation) is an injected event, never
            # intercepted (measured: fetch_from_mmio_cpl3 in the lab, one exit and decode fewer).
            self.stats["exits"] += 1
            self.stats["insn_emulation"] += 1
            self.kvm_fault = True


class PvmBus(ModelBus):
    """kvm_pvm: CPL0 in KVM's emulator (batches of emul_batch instructions), CPL3 native."""

    def __init__(self, profile: HostProfile, vcpu: Vcpu) -> None:
        super().__init__(profile, vcpu)
        self.in_entry = False      # an emulation entry is running (counted in `exits` when it ends)
        self.batch = 0
        self.batch_limit = profile.emul_batch or 1024

    def begin(self, cpu: X86Cpu) -> None:
        self.iter_mmio_write = False
        self.delivering = False
        self.vcpu.rflags = cpu.rflags           # EFLAGS.AC for SMAP
        if cpu.cpl != 0:
            self.emulating = False
            return
        self.emulating = True
        if not self.in_entry:
            self.in_entry, self.batch = True, 0
            self.vcpu.process_requests()      # vcpu_enter_guest: requests, then kvm_mmu_reload
        elif self.batch >= self.batch_limit:
            self.stats["exits"] += 1          # the batch is used up: back to the host, re-enter
            self.batch = 0
            self.vcpu.process_requests()
        self.batch += 1
        if cpu.rip >> 47 in (0, 0x1FFFF):
            self.stats["insn_emulation"] += 1  # a non-canonical RIP is #GP before any decode (measured)

    def _in_emulator(self, cpl: int) -> bool:
        return self.emulating or self.delivering or cpl == 0

    def _hw(self, gva: int, size: int, kind: str, value: int | None, cpl: int, implicit: bool,
            restart: bool = False) -> int:
        if cpl == 3 and self.profile.user_slot256_faults:
            for pgva, _off, _n in pieces(gva, size):
                if pgva >> 39 == _SLOT256:
                    self._slot256_fault(pgva, kind)
        return super()._hw(gva, size, kind, value, cpl, implicit, restart)

    def _slot256_fault(self, gva: int, kind: str) -> None:
        """A CPL3 access to PML4 slot 256: the host's own #PF, not the MMU's (no pf_taken, no walk of
        the guest's tables: no A bit); one exit and one insn_emulation_fail, then the #PF is
        delivered (measured).  The error code is the not-present form, with I/D on a fetch even
        without EFER.NXE (the host adds P|RSVD on some runs)."""
        self.stats["exits"] += 1
        self.stats["insn_emulation_fail"] += 1
        err = PFERR_USER_MASK | (PFERR_WRITE_MASK if kind in ("write", "rmw") else 0) \
            | (PFERR_FETCH_MASK if kind == "fetch" else 0)
        raise CpuFault(PF_VECTOR, err, gva)

    def _end_entry(self) -> None:
        if self.in_entry:
            self.stats["exits"] += 1
            self.in_entry = False

    def _userspace_exit(self) -> None:
        self._end_entry()

    def abort(self, cpu: X86Cpu, fault: CpuFault) -> None:
        if cpu.cpl == 0:
            # kvm_pvm ends the emulation entry once an exception is queued, and delivers it at the
            # next entry (measured: a #PF whose handler halts is 2 exits, a CPL0 IRETQ none).
            self._end_entry()
            return
        if self.emulating:
            return                               # raised inside KVM's emulation of a CPL3 exit
        if fault.vector == PF_VECTOR:
            return                               # the #PF exit was counted by the MMU (pf_taken)
        self.stats["exits"] += 1                 # exception exit from native user mode
        if fault.vector == GP and self.profile.gp_at_cpl3_emulated:
            self.stats["insn_emulation"] += 1    # #GP intercept: the instruction is emulated first
        elif fault.vector == UD and not (cpu.instr is not None and cpu.instr.ip == cpu.rip
                                         and cpu.instr.mnemonic == _UD2):
            # #UD intercept: KVM decodes the instruction, then queues #UD (measured: `lock nop`
            # counts one insn_emulation; `ud2` none).
            self.stats["insn_emulation"] += 1

    def write_cr(self, cpu: X86Cpu, cr: int, value: int) -> None:
        vcpu = self.vcpu
        fn = {0: vcpu.write_cr0, 3: vcpu.write_cr3, 4: vcpu.write_cr4}[cr]
        try:
            fn(value, exit=False)      # an emulated MOV CR takes no exit of its own
        except InvalidArgument:
            raise CpuFault(GP, 0) from None     # KVM refuses the value: the emulator injects #GP
        if not vcpu.mmu.root_valid:
            self._end_entry()       # no usable root (a new CR3, a new role): loaded at the next entry

    def soft_int(self, cpu: X86Cpu, vector: int) -> bool:
        """INT3/INT n.  CPL0: KVM's emulator cannot deliver it (emulation failure, internal error).
        CPL3 (measured): INT3 and INT 3 reach the IDT whatever the gate's DPL; any other INT n is
        #UD after a failed emulation (hardware: #GP(vector*8+2) through a DPL0 gate)."""
        if cpu.cpl == 0 or vector != 3:
            self.unemulatable(cpu, f"int {vector}")
        self.stats["exits"] += 1
        return True

    def deliver_failed(self, cpu: X86Cpu, vector: int) -> bool:
        """kvm_pvm moves on to the next event (#DF, then the triple fault) inside the same entry: a
        failed delivery costs no exit of its own, so an escalation to a triple fault is the one
        KVM_EXIT_SHUTDOWN (measured: #PF, #GP, #DE, #UD through not-present gates, at both rings)."""
        force_df = super().deliver_failed(cpu, vector)
        self.in_entry = False
        return force_df

    def unemulatable(self, cpu: X86Cpu, what: str) -> None:
        """An instruction KVM's emulator fails on: at CPL0 KVM_EXIT_INTERNAL_ERROR; at CPL3 it faults
        natively and kvm_pvm's attempt to emulate it fails too: #UD."""
        self.stats["insn_emulation_fail"] += 1
        if cpu.cpl == 0:
            self._end_entry()
            raise Stop("internal_error", f"KVM's emulator cannot execute {what!r}")
        self.stats["insn_emulation"] += 1
        self.stats["exits"] += 1
        self.emulating = True
        raise CpuFault(UD)

    def invlpg(self, cpu: X86Cpu, gva: int) -> None:
        self.vcpu.invlpg(gva, exit=False)

    def halt(self, cpu: X86Cpu) -> None:
        self.in_entry = False
        self.stats["exits"] += 1
        self.stats["halt_exits"] += 1
        raise Stop("hlt")

    def iret(self, cpu: X86Cpu, new_cpl: int) -> None:
        """KVM's emulator has no long-mode IRET (insn_emulation_fail + 1) and kvm_pvm finishes it
        without leaving the entry (measured: a CPL0 IRETQ to CPL0 then HLT is 1 exit); a return to
        CPL3 ends the emulation entry (the guest runs natively again)."""
        if self.profile.iret_fails_emulation:
            self.stats["insn_emulation_fail"] += 1
        if new_cpl != 0:
            self._end_entry()


# KVM on AMD SVM in the nested lab (QEMU TCG): svm-npt-tdp, svm-npt-legacy, svm-shadow (+ -nommio);
# the module adds them to PROFILES (it subclasses NativeBus above, hence the import down here).
from . import profiles_svm  # noqa: E402, F401

__all__ = ["PROFILES", "Emulator", "HostProfile", "ModelBus", "NativeBus", "PvmBus", "get_profile"]
