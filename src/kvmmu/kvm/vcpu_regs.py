"""A vCPU's control registers: KVM_SET_SREGS and the guest's MOV to CR0/CR3/CR4, WRMSR(EFER) and
INVLPG (x86.c's kvm_set_cr0/cr3/cr4, __set_sregs, load_pdptrs), with the MMU context they reset.

`Vcpu` (kvm/vcpu.py) inherits these; what they need of it is declared below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..arch.bits import (
    EFER_LMA,
    EFER_LME,
    EFER_NX,
    X86_CR0_CD,
    X86_CR0_NW,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR0_WP,
    X86_CR4_LA57,
    X86_CR4_PAE,
    X86_CR4_PCIDE,
    X86_CR4_PGE,
    X86_CR4_PKE,
    X86_CR4_PSE,
    X86_CR4_SMAP,
    X86_CR4_SMEP,
)
from ..errors import InvalidArgument
from .exits import EXIT_CR_ACCESS, EXIT_INVLPG

if TYPE_CHECKING:
    from ..hw.cpu import Cpu
    from ..hw.tdp import TdpCpu
    from .mmu.context import VcpuMmu
    from .stats import Stats
    from .vm import VM

_CR0_ROLE_BITS = X86_CR0_PG | X86_CR0_WP
_CR4_ROLE_BITS = X86_CR4_PSE | X86_CR4_PAE | X86_CR4_SMEP | X86_CR4_SMAP | X86_CR4_PKE | X86_CR4_LA57
_EFER_ROLE_BITS = EFER_NX | EFER_LMA
_CR0_PDPTR_BITS = X86_CR0_CD | X86_CR0_NW | X86_CR0_PG
_CR4_PDPTR_BITS = X86_CR4_PGE | X86_CR4_PSE | X86_CR4_PAE | X86_CR4_SMEP
_CR0_RESERVED = ~((1 << 32) - 1) & ((1 << 64) - 1)
# Defined CR4 bits: 0-14 (VME .. SMXE), 16-25 (FSGSBASE .. UINTR), 28 (LAM_SUP).
_CR4_RESERVED = ((1 << 64) - 1) & ~(((1 << 15) - 1) | (((1 << 10) - 1) << 16) | (1 << 28))
# Defined EFER bits: SCE, LME, LMA, NXE, SVME, LMSLE, FFXSR, TCE, AUTOIBRS.
_EFER_RESERVED = ((1 << 64) - 1) & ~((1 << 0) | (1 << 8) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 13)
                                     | (1 << 14) | (1 << 15) | (1 << 21))


def _check_control(regs: dict[str, int], pku: bool = True) -> None:
    """The #GP conditions of MOV to CR0/CR4 and WRMSR(EFER) (SDM Vol. 3A 2.5; KVM's kvm_is_valid_cr0 /
    kvm_is_valid_cr4 / efer_reserved_bits, which KVM_SET_SREGS applies too).  Without PKU (`VM.pku`)
    CR4.PKE is reserved, as KVM's __cr4_reserved_bits makes it."""
    for name, rsvd, what in (("cr0", _CR0_RESERVED, "CR0 bits 63:32"), ("cr4", _CR4_RESERVED, "reserved CR4 bits"),
                             ("efer", _EFER_RESERVED, "reserved EFER bits")):
        if regs[name] & rsvd:
            raise InvalidArgument(name, regs[name], f"{what} must be 0 ({regs[name] & rsvd:#x} set: #GP)")
    if not pku and regs["cr4"] & X86_CR4_PKE:
        raise InvalidArgument("cr4", regs["cr4"], "CR4.PKE is reserved: the vCPU has no PKU (KVM offers it only "
                              "with TDP: kvm_set_cpu_caps) (#GP)")
    cr0 = regs["cr0"]
    if cr0 & X86_CR0_PG and not cr0 & X86_CR0_PE:
        raise InvalidArgument("cr0", cr0, "CR0.PG needs CR0.PE (#GP)")
    if cr0 & X86_CR0_NW and not cr0 & X86_CR0_CD:
        raise InvalidArgument("cr0", cr0, "CR0.NW needs CR0.CD (#GP)")


def _check_u64(name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise InvalidArgument(name, value, f"{name} is an unsigned 64-bit register")


class ControlRegisters:
    """The control-register half of a vCPU."""

    vm: VM
    id: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cpl: int
    rflags: int
    pkru: int
    rip: int
    as_id: int
    requests: set[str]
    stats: Stats
    cpu: Cpu | TdpCpu
    mmu: VcpuMmu
    walk_mmu: VcpuMmu
    cr3_load_exiting: bool
    invlpg_exiting: bool

    if TYPE_CHECKING:
        def _exit(self, reason: int) -> None: ...      # Vcpu's: an intercepted instruction's VM exit
        def _entry(self) -> None: ...

    def set_sregs(self, *, cr0: int | None = None, cr3: int | None = None, cr4: int | None = None,
                  efer: int | None = None, cpl: int | None = None, rflags: int | None = None,
                  pkru: int | None = None) -> None:
        """KVM_SET_SREGS (+ the PKRU/RFLAGS the MMU reads): validated first, applied all at once.

        Like KVM's __set_sregs, PAE PDPTEs are (re)loaded whenever the result is PAE paging."""
        if cpl is not None and cpl not in (0, 1, 2, 3):
            raise InvalidArgument("cpl", cpl, "CPL is 0, 1, 2 or 3")
        if rflags is not None:
            _check_u64("rflags", rflags)
        if pkru is not None and (type(pkru) is not int or not 0 <= pkru < 1 << 32):
            raise InvalidArgument("pkru", pkru, "PKRU is a 32-bit register")
        new_cr0, new_efer = self.cr0 if cr0 is None else cr0, self.efer if efer is None else efer
        new_cr3 = self.cr3 if cr3 is None else cr3
        if isinstance(new_cr3, int) and isinstance(new_cr0, int) and isinstance(new_efer, int) \
                and new_cr0 & X86_CR0_PG and new_efer & EFER_LME:
            self._check_cr3(new_cr3, "KVM_SET_SREGS refuses it with EINVAL (kvm_is_valid_sregs)")
        self._set_control(cr0, cr3, cr4, efer, reload_pdptrs=True, after=lambda: self._set_rest(cpl, rflags, pkru))

    def _check_cr3(self, cr3: int, what: str) -> None:
        """kvm_vcpu_is_legal_cr3: CR3 is a guest-physical address, so bits 63:MAXPHYADDR are
        reserved (the model has no LAM, whose CR3 bits 61/62 KVM would exempt)."""
        width = self.vm.guest_maxphyaddr
        if cr3 >> width:
            raise InvalidArgument("cr3", cr3, f"bits 63:{width} are reserved above the guest MAXPHYADDR "
                                  f"({cr3 >> width << width:#x} set): {what}")

    def _set_rest(self, cpl: int | None, rflags: int | None, pkru: int | None) -> None:
        if cpl is not None:
            self.cpl = cpl
        if rflags is not None:
            self.rflags = rflags | 2
        if pkru is not None:
            self.pkru = pkru

    def _set_control(self, cr0: int | None, cr3: int | None, cr4: int | None, efer: int | None, *,
                     reload_pdptrs: bool, after: Callable[[], None] | None = None) -> None:
        """Validate the new control registers, load PDPTEs if asked (a failure changes nothing), apply,
        and reset the MMU context."""
        new = {"cr0": self.cr0 if cr0 is None else cr0, "cr3": self.cr3 if cr3 is None else cr3,
               "cr4": self.cr4 if cr4 is None else cr4, "efer": self.efer if efer is None else efer}
        for name, value in new.items():
            if not isinstance(value, int) or value < 0 or value >> 64:
                raise InvalidArgument(name, value, "control registers are unsigned 64-bit integers")
        _check_control(new, self.vm.pku)
        efer_v = new["efer"]
        if new["cr0"] & X86_CR0_PG and efer_v & EFER_LME:
            if not new["cr4"] & X86_CR4_PAE:
                raise InvalidArgument("cr4", new["cr4"], "long mode paging (EFER.LME, CR0.PG) needs CR4.PAE")
            efer_v |= EFER_LMA
        else:
            efer_v &= ~EFER_LMA
        if new["cr4"] & X86_CR4_LA57 and not efer_v & EFER_LMA:
            raise InvalidArgument("cr4", new["cr4"], "CR4.LA57 is only valid in long mode")
        pae_legacy = new["cr0"] & X86_CR0_PG and new["cr4"] & X86_CR4_PAE and not efer_v & EFER_LMA
        pdptrs = self._load_pdptrs(new["cr3"]) if reload_pdptrs and pae_legacy else None
        self.cr0, self.cr3, self.cr4, self.efer = new["cr0"], new["cr3"], new["cr4"], efer_v
        if after is not None:
            after()
        if pdptrs is not None:
            self.mmu.pdptrs = pdptrs
        self.reset_mmu_context()

    def _load_pdptrs(self, cr3: int) -> tuple[int, ...]:
        """load_pdptrs: PAE's four PDPTEs are read from the PDPT; an unreadable PDPT (no memslot) or a
        reserved bit in a present PDPTE makes the load fail, which is a #GP for MOV CR0/CR3/CR4."""
        base = cr3 & 0xFFFFFFE0
        if self.vm.memslots.spaces[self.as_id].search(base >> 12) is None:
            raise InvalidArgument("cr3", cr3, f"the PAE PDPT at gpa {base:#x} is in no memslot "
                                  "(load_pdptrs fails: MOV to CR3 would #GP)")
        ptes = tuple(self.vm.read_guest_quiet(base + 8 * i, 8) for i in range(4))
        rsvd = (1 << 63) | (((1 << 63) - 1) & ~((1 << self.vm.guest_maxphyaddr) - 1)) | 0x1E6
        for i, pte in enumerate(ptes):
            if pte & 1 and pte & rsvd:
                raise InvalidArgument("pdpte", pte, f"PDPTE {i} has reserved bits set (MOV CR3 would #GP)")
        return ptes

    def reset_mmu_context(self) -> None:
        """kvm_mmu_reset_context: drop every root; the next entry builds them for the new role."""
        self.mmu.unload()
        self.mmu.init_context()
        if self.walk_mmu is not self.mmu:    # kvm_init_mmu: init_kvm_nested_mmu when mmu_is_nested
            self.walk_mmu.init_context()
        self.cpu.flush()

    # -- guest-side control-register writes (intercepted under shadow paging) -----------------------
    # `exit=False`: the write is made by an instruction KVM is already emulating, which takes no exit.
    # SDM Vol. 3A 4.4.1 (KVM's X86_CR0_PDPTR_BITS / X86_CR4_PDPTR_BITS): with PAE paging, MOV to CR0
    # or CR4 reloads the PDPTEs only when it changes one of these bits; the MMU role is reset only
    # when a role bit changes (KVM_MMU_CR0_ROLE_BITS / KVM_MMU_CR4_ROLE_BITS / EFER).
    def write_cr0(self, value: int, exit: bool = True) -> None:
        _check_u64("cr0", value)
        self._write_control("cr0", self.cr0, value, _CR0_PDPTR_BITS, _CR0_ROLE_BITS, exit)

    def write_cr4(self, value: int, exit: bool = True) -> None:
        _check_u64("cr4", value)
        self._write_control("cr4", self.cr4, value, _CR4_PDPTR_BITS, _CR4_ROLE_BITS, exit)

    def write_efer(self, value: int, exit: bool = True) -> None:
        _check_u64("efer", value)
        self._write_control("efer", self.efer, value, 0, _EFER_ROLE_BITS | EFER_LME, exit)

    def _write_control(self, name: str, old: int, value: int, pdptr_bits: int, role_bits: int, exit: bool) -> None:
        # A refused write (the guest's #GP) raises before anything changes, its exit included;
        # _set_control makes the same checks before it applies anything.
        changed = old ^ value
        if changed & (pdptr_bits | role_bits):
            regs: dict[str, int | None] = {"cr0": None, "cr3": None, "cr4": None, "efer": None, name: value}
            self._set_control(regs["cr0"], regs["cr3"], regs["cr4"], regs["efer"],
                              reload_pdptrs=bool(changed & pdptr_bits))
        else:
            _check_control({"cr0": self.cr0, "cr4": self.cr4, "efer": self.efer, name: value}, self.vm.pku)
            setattr(self, name, value)
        if exit:
            self._exit(EXIT_CR_ACCESS)
            if name != "efer" and self.vm.trace.enabled:
                self.vm.trace.emit("kvm_cr", rw=1, cr=int(name[2]), val=value)
        if name == "cr4" and changed & X86_CR4_PGE:
            self.cpu.flush()                 # MOV to CR4 changing PGE flushes global entries too
        if exit:
            self._entry()

    def write_cr3(self, value: int, flush: bool = True, exit: bool = True) -> None:
        """MOV to CR3 (kvm_set_cr3): reuse a cached root if one matches, resync, flush the TLB."""
        if not isinstance(value, int) or value < 0 or value >> 64:
            raise InvalidArgument("cr3", value, "CR3 is an unsigned 64-bit register")
        paging = self.cr0 & X86_CR0_PG
        pae_legacy = paging and self.cr4 & X86_CR4_PAE and not self.efer & EFER_LMA
        if self.cr4 & X86_CR4_PCIDE:
            value &= ~(1 << 63)      # X86_CR3_PCID_NOFLUSH is an operand bit, never part of CR3
        if value != self.cr3 or pae_legacy:
            self._check_cr3(value, "MOV to CR3 is a #GP (kvm_set_cr3)")
        if not self.cr3_load_exiting:
            # With EPT/NPT (L1's or L2's), MOV CR3 does not exit: the CPU loads it (and PAE PDPTEs) and flushes.
            if pae_legacy:
                self.mmu.pdptrs = self._load_pdptrs(value)
            self.cr3 = value
            if flush:
                self.cpu.flush()
            return
        if pae_legacy:
            self.mmu.pdptrs = self._load_pdptrs(value)      # a refusal (#GP) happens before the exit counts
        if exit:
            self._exit(EXIT_CR_ACCESS)
            if self.vm.trace.enabled:
                self.vm.trace.emit("kvm_cr", rw=1, cr=3, val=value)
        if value != self.cr3:
            if pae_legacy:
                self.cr3 = value
                self.mmu.free_current_root()
            else:
                self.mmu.new_pgd(value)
                self.cr3 = value
        if flush:
            self.requests.add("KVM_REQ_MMU_SYNC")
            self.requests.add("KVM_REQ_TLB_FLUSH_CURRENT")
        if exit:
            self._entry()

    def invlpg(self, gva: int, exit: bool = True) -> None:
        """INVLPG: under shadow paging KVM intercepts it and resyncs the spte if its page is unsync."""
        if not isinstance(gva, int) or gva < 0 or gva >> 64:
            raise InvalidArgument("gva", gva, "an address is an unsigned 64-bit integer")
        if not self.invlpg_exiting:
            self.cpu.flush_gva(gva)          # not intercepted with TDP: the CPU handles it
            return
        if exit:
            self._exit(EXIT_INVLPG)
        self.stats["invlpg"] += 1
        self.cpu.flush_gva(gva)
        self.mmu.invalidate_addr(gva)
        if exit:
            self._entry()



__all__ = ["ControlRegisters"]
