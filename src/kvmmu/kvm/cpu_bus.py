"""The software CPU's bus into the model (`X86Cpu.bus`): how a host profile's guest instructions
reach KVM.  The CPU's own accesses go through ``vcpu.access`` (TLB, page faults, KVM's fault path);
once KVM emulated an access, the rest of that instruction goes through KVM's emulator
(`soft_emulator.Emulator`), as in x86_emulate_instruction.  One bus class per way of running guest
code (the host profiles of `kvmmu.kvm.profiles` name theirs in `HostProfile.bus`):

- `NativeBus`: every ring on the CPU (VMX; SVM adds its TCG quirks in `profiles_svm.SvmTcgBus`);
- `PvmBus`: kvm_pvm, CPL0 in KVM's emulator in batches of instructions, CPL3 on the CPU.
"""

from __future__ import annotations

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
from ..hw.x86cpu import GP, UD, CpuFault, Reexecute, Stop, X86Cpu
from .emulate import pieces
from .emulate_retry import page_table_writing_insn
from .soft_emulator import Emulator

if TYPE_CHECKING:
    from .profiles import HostProfile
    from .vcpu import Vcpu

_UD2 = ix.Mnemonic.UD2
_SLOT256 = 0x1FFFF00          # gva >> 39 of PML4 slot 256 (0xffff800000000000..)
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})


def _fault(vector: int, error_code: int, cr2: int | None) -> CpuFault:
    return CpuFault(vector, error_code if vector in _ERROR_CODE_VECTORS else None, cr2)


def _set_cr(vcpu: Vcpu, cr: int, value: int, exit: bool) -> None:
    """MOV to CR0, CR3 or CR4 (the decoder gives no other)."""
    if cr == 0:
        vcpu.write_cr0(value, exit=exit)
    elif cr == 3:
        vcpu.write_cr3(value, exit=exit)
    else:
        vcpu.write_cr4(value, exit=exit)


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
        try:
            _set_cr(self.vcpu, cr, value, exit=True)
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
        try:
            _set_cr(vcpu, cr, value, exit=False)      # an emulated MOV CR takes no exit of its own
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


__all__ = ["ModelBus", "NativeBus", "PvmBus"]
