"""A vCPU: the register state the MMU needs, the run loop of one guest access, and KVM's requests.

`access()` is the life of one guest memory access: the modelled CPU translates it (TLB, then KVM's
tables); an exit runs KVM (`kvm_mmu_page_fault`), which fixes the tables and resumes, injects a #PF
into the guest, or emulates the access (in-kernel device, RAM, or KVM_EXIT_MMIO to the VMM).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..arch.bits import (
    EFER_LMA,
    PF_VECTOR,
    PFERR_FETCH_MASK,
    PFERR_GUEST_PAGE_MASK,
    PFERR_IMPLICIT_ACCESS,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    PT64_ADDR_MASK,
    X86_CR4_LA57,
    X86_EFLAGS_AC,
)
from ..arch.walker import canonical
from ..errors import InvalidArgument, KvmBug
from ..hw.cpu import ACCESS_KINDS, ACCESS_SIZES, GP_FAULT, GUEST_FAULT, Cpu, DecodedAccesses, check_access_args
from ..hw.tdp import TdpCpu
from ..hw.vmcs import TdpControls
from .emulate import MmioExit, emulate_access
from .emulate_retry import retry_instruction
from .exceptions import GuestFault
from .exits import trace_exit, trace_page_fault_exit
from .memslots import Memslot
from .mmu.context import VcpuMmu
from .mmu.fault import kvm_mmu_page_fault
from .mmu.guest_reader import GuestPteReader
from .mmu.mmio_cache import MmioCache
from .mmu.pf import RET_PF_EMULATE
from .nested import enter_guest_mode, leave_guest_mode
from .stats import MODEL_COUNTERS, VCPU_STATS, Stats
from .vcpu_regs import ControlRegisters

if TYPE_CHECKING:
    from .mmu.nested_ept import NestedMmu, ShadowEptMmu
    from .nested import NestedExit
    from .vm import VM

_MAX_ENTRIES = 64


@dataclass
class AccessResult:
    value: int | None = None
    fault: GuestFault | None = None
    # The KVM_EXIT_MMIO exits the access made, in order (each one also counts in KVM's mmio_exits and
    # exits stats); not named `exits`, which is KVM's counter of every VM exit.
    mmio_exit_records: list[MmioExit] = field(default_factory=list)
    l1_exit: object | None = None       # NestedExit: the access by L2 ended in a VM exit to L1
    # KVM_EXIT_INTERNAL_ERROR's suberror when KVM gave up (kvm_deviations: a fetch from MMIO)
    internal_error: str | None = None
    # With Vcpu.defer_emulation: the fault path returned RET_PF_EMULATE and nothing was accessed;
    # the caller's emulator executes the instruction (x86_emulate_instruction decodes it afresh).
    emulate: bool = False

    @property
    def ok(self) -> bool:
        return self.fault is None and self.internal_error is None

    @property
    def exits(self) -> list[MmioExit]:
        """Deprecated: the old name of `mmio_exit_records` (it read like KVM's `exits` counter)."""
        warnings.warn("AccessResult.exits is deprecated: use AccessResult.mmio_exit_records", DeprecationWarning,
                      stacklevel=2)
        return self.mmio_exit_records


class Vcpu(ControlRegisters):
    """One vCPU: its registers (control registers in kvm/vcpu_regs.py), its MMU contexts, and the run
    loop of a guest access."""

    def __init__(self, vm: VM, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.cr0 = 0
        self.cr3 = 0
        self.cr4 = 0
        self.efer = 0
        self.cr2 = 0
        self.cpl = 0
        self.rflags = 0x2
        # What kvm_exit / kvm_emulate_insn report: the software CPU sets them for real code; a scripted
        # guest has no instruction, so they stay 0 and empty.
        self.rip = 0
        self.insn_bytes = b""
        self.pkru = 0
        self.stats = Stats(VCPU_STATS)
        self.counters = Stats(MODEL_COUNTERS)
        self.mmio_cache = MmioCache(self)     # vcpu->arch's, shared by root_mmu and guest_mmu
        self.as_id = 0
        self.mmu_is_nested = False
        self.last_used_slot: list[Memslot | None] = [None]
        # kvm_vcpu_reset flushes the guest TLB: the real /dev/kvm shows tlb_flush=1 on a first run.
        self.requests: set[str] = {"KVM_REQ_TLB_FLUSH_GUEST"}
        self.pending_exception: GuestFault | None = None
        self.pending_nested_exit: NestedExit | None = None      # for L1, while L2 runs
        # A CPU model that runs the instruction in its own emulator when KVM would emulate it sets
        # this: RET_PF_EMULATE then returns AccessResult.emulate instead of emulating the access.
        self.defer_emulation = False
        # retry_instruction (kvm/emulate_retry.py): the instruction a CPU model is executing, as
        # (RIP, emulate.c's PageTable flag), None when there is none; whether kvm_mmu_page_fault
        # allowed a retry (EMULTYPE_ALLOW_RETRY_PF); and vcpu->arch.last_retry_{eip,addr}.
        self.emul_insn: tuple[int, bool] | None = None
        self.allow_retry_pf = False
        self.last_retry = (0, 0)
        self.guest_mmu: ShadowEptMmu | None = None      # shadows L1's EPT (nested TDP)
        self.nested_mmu: NestedMmu | None = None        # the emulator's walks of L2's tables
        self.l1_state: tuple = ()
        self.pte_reader = GuestPteReader(self)
        self.mmu = VcpuMmu(self)                        # root_mmu, or guest_mmu while L2 runs
        self.walk_mmu = self.mmu                        # what the emulator translates with
        # VMX/SVM intercepts, set once when the vCPU is created (vmx_exec_control, init_vmcb and the
        # exception bitmap): with EPT/NPT the CPU loads CR3, executes INVLPG and delivers a guest #PF
        # itself, for L1 and for L2.
        self.cr3_load_exiting = self.invlpg_exiting = self.pf_exiting = not vm.tdp_enabled
        if vm.tdp_enabled:        # the CPU model of the VM's MMU (kvm_configure_mmu's tdp_enabled)
            self.cpu: Cpu | TdpCpu = TdpCpu(vm.host, self.counters, TdpControls(
                ept=vm.flavour == "ept", level=vm.tdp_level, ept_ad=bool(vm.mmu.masks.accessed)))
        else:
            self.cpu = Cpu(vm.host.mem, self.counters)
        self.cpu.load_vmcs(self, self.mmu)     # the vCPU's registers and its MMU context (hw/vmcs.py)

    # -- state -----------------------------------------------------------------------------------
    # Read-only aliases of the MMIO cache's fields, for tests and external users; KVM code goes
    # through `mmio_cache`.
    @property
    def mmio_gva(self) -> int:
        return self.mmio_cache.mmio_gva

    @property
    def mmio_gfn(self) -> int:
        return self.mmio_cache.mmio_gfn

    @property
    def mmio_access(self) -> int:
        return self.mmio_cache.mmio_access

    @property
    def mmio_gen(self) -> int:
        return self.mmio_cache.mmio_gen

    @property
    def ac(self) -> bool:
        return bool(self.rflags & X86_EFLAGS_AC)

    def _exit(self, reason: int) -> None:
        """An intercepted instruction's VM exit (`reason` in VMX numbering; kvm_exit shows the ISA's name)."""
        self.stats["exits"] += 1
        if self.vm.trace.enabled:
            trace_exit(self, reason)

    def _entry(self) -> None:
        if self.vm.trace.enabled:
            self.vm.trace.emit("kvm_entry", vcpu_id=self.id, rip=self.rip)

    # -- KVM's side of an exit -------------------------------------------------------------------
    def inject_page_fault(self, error_code: int, cr2: int) -> None:
        self.stats["pf_guest"] += 1
        # kvm_inject_emulated_page_fault.  SDM 4.10.4.1: a #PF invalidates the TLB entries of its
        # page, and under shadow paging KVM's sptes are part of that TLB (an unsync spte may still
        # map it).  KVM invalidates only for P=1, non-RSVD faults (the P=0 case leaves a stale unsync
        # spte, a guest-visible departure kept behind kvm_deviations).  It is walk_mmu's fault (L2's
        # #PF is nested_mmu's, which has nothing to sync).
        if not self.vm.kvm_deviations or error_code & (PFERR_PRESENT_MASK | PFERR_RSVD_MASK) == PFERR_PRESENT_MASK:
            self.walk_mmu.invalidate_addr(cr2, current_only=True)
        self.cpu.flush_gva(cr2)              # a #PF invalidates the TLB entries for its address
        self.pending_exception = GuestFault(PF_VECTOR, error_code & 0xFFFF, cr2)
        self.cr2 = cr2
        if self.vm.trace.enabled:
            self.vm.trace.emit("kvm_inj_exception", exception=PF_VECTOR, has_error=True, error_code=error_code & 0xFFFF)

    def deliver_guest_fault(self, error_code: int, cr2: int) -> None:
        """A #PF the CPU delivered to the guest by itself (TDP; it flushed the address): KVM never sees it."""
        self.pending_exception = GuestFault(PF_VECTOR, error_code & 0xFFFF, cr2)
        self.cr2 = cr2

    def enter_guest_mode(self, eptp: int, *, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        """Run L2 (nested EPT rooted at `eptp`, which L1 keeps in its memory) from now on."""
        enter_guest_mode(self, eptp, cr0, cr3, cr4, efer)

    def leave_guest_mode(self) -> None:
        leave_guest_mode(self)

    def _nested_exit(self, result: AccessResult) -> AccessResult:
        result.l1_exit, self.pending_nested_exit = self.pending_nested_exit, None
        self.leave_guest_mode()
        return result

    def take_exception(self) -> GuestFault | None:
        exc, self.pending_exception = self.pending_exception, None
        return exc

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        """kvm_vcpu_gfn_to_memslot (counted; uses the vCPU's last-used-slot cache)."""
        c = self.counters
        c["memslot_lookups"] += 1
        ms = self.vm.memslots
        last = self.last_used_slot[0]
        # Memslots.gfn_to_memslot's last-used-slot hit, inlined (a few per fault): same counts.
        if last is not None and last.base_gfn <= gfn < last.base_gfn + last.npages \
                and ms.spaces[self.as_id].by_id.get(last.id) is last:
            ms.lookups += 1
            return last
        before = ms.searches
        slot = ms.gfn_to_memslot(gfn, self.as_id, self.last_used_slot)
        c["memslot_searches"] += ms.searches - before
        return slot

    def process_requests(self) -> None:
        """vcpu_enter_guest's request handling, then kvm_mmu_reload."""
        req = self.requests
        if req:
            if "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS" in req:
                req.discard("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS")
                self.mmu.free_obsolete_roots()
            if "KVM_REQ_MMU_SYNC" in req:
                req.discard("KVM_REQ_MMU_SYNC")
                if self.mmu.root_valid:
                    self.mmu.sync_roots()
            if "KVM_REQ_TLB_FLUSH" in req:
                req.discard("KVM_REQ_TLB_FLUSH")
                self.stats["tlb_flush"] += 1
                self.cpu.flush()
            if "KVM_REQ_TLB_FLUSH_GUEST" in req:
                req.discard("KVM_REQ_TLB_FLUSH_GUEST")
                self.stats["tlb_flush"] += 1
                if self.mmu.root_valid:
                    self.mmu.sync_roots()
                self.cpu.flush()
            if "KVM_REQ_TLB_FLUSH_CURRENT" in req:
                req.discard("KVM_REQ_TLB_FLUSH_CURRENT")
                self.cpu.flush()
        if not self.mmu.root_valid:
            if self.mmu.root_hpa:
                self.mmu.free_current_root()
            self.mmu.load()
            self.cpu.flush()

    # -- one guest access ---------------------------------------------------------------------------
    def access(self, gva: int, size: int, kind: str = "read", value: int | bytes | None = None,
               cpl: int | None = None, implicit: bool = False) -> AccessResult:
        """The guest performs one memory access of `size` bytes at linear address `gva`."""
        c = self.cpl if cpl is None else cpl
        # The common arguments (plain ints and the three kinds) are checked here, and a RAM access
        # that the TLB completes is done here (no request pending, a valid root: the run loop would
        # have nothing else to do, and the CPL swap would be invisible).  Anything else, invalid
        # arguments included, takes _access_full, which holds the argument checks of the API.
        if (not implicit and type(gva) is int and 0 <= gva <= 0xFFFF_FFFF_FFFF_FFFF and type(size) is int
                and (size == 8 or size == 4 or size == 1 or size == 2) and type(c) is int and 0 <= c <= 3):
            if kind == "read" or kind == "fetch":
                write = False
                pfec = 0 if kind == "read" else PFERR_FETCH_MASK
                valid = value is None
            else:
                write = True
                pfec = PFERR_WRITE_MASK
                valid = kind == "write" and type(value) is int and 0 <= value < 1 << (size << 3)
            if valid:
                if c == 3:
                    pfec |= PFERR_USER_MASK
                mmu = self.mmu
                sp = mmu.root_sp
                if (gva & 0xFFF) + size <= 0x1000 and not self.requests and sp is not None and mmu.root_hpa \
                        and not sp.invalid and sp.mmu_valid_gen == mmu.kvm.mmu_valid_gen:
                    v = self.cpu.tlb_access(gva, size, pfec, value)  # type: ignore[arg-type]  # None: a read
                    if v >= 0:
                        self.vm.trace.current_vcpu = self.id
                        return AccessResult() if write else AccessResult(v)
                saved_cpl, self.cpl = self.cpl, c
                try:
                    # (`valid` made a write's value an int)
                    data = value.to_bytes(size, "little") if write else b""  # type: ignore[union-attr]
                    return self._access(gva, size, write, data, pfec)
                finally:
                    self.cpl = saved_cpl
        return self._access_full(gva, size, kind, value, cpl, implicit)

    def _access(self, gva: int, size: int, write: bool, data: bytes, pfec: int) -> AccessResult:
        vm = self.vm
        vm.trace.current_vcpu = self.id
        result = AccessResult()
        first = 0x1000 - (gva & 0xFFF)
        if first >= size:
            pieces: tuple[tuple[int, int], ...] = ((gva, size),)
        else:
            pieces = ((gva, first), ((gva + first) & ((1 << 64) - 1), size - first))
        translate = self.cpu.translate
        mmu = self.mmu
        # The linear-address width from the registers (the MMU context may not be built yet).
        bits = (57 if self.cr4 & X86_CR4_LA57 else 48) if self.efer & EFER_LMA else 32
        if bits == 32 and gva >> 32:
            raise InvalidArgument("gva", gva, "linear addresses are 32 bits wide outside long mode")
        sp = mmu.root_sp
        if self.requests or sp is None or not mmu.root_hpa or sp.invalid or sp.mmu_valid_gen != mmu.kvm.mmu_valid_gen:
            self.process_requests()       # (otherwise it would find nothing to do)
        last = gva + size - 1
        if bits > 32:
            # Canonical checks come before paging: #GP, with nothing translated or written.
            if not canonical(gva, bits) or not canonical(last & ((1 << 64) - 1), bits):
                result.fault = GuestFault(13, 0, None)
                return result
        elif last >> 32:
            result.fault = GuestFault(13, 0, None)     # wraps past the 4 GiB segment limit
            return result
        hpas: list[int] = []
        for pgva, _plen in pieces:
            attempts = 0
            while True:
                hpa, addr, err = translate(pgva, pfec)
                if hpa >= 0:
                    hpas.append(hpa)
                    break
                if hpa == GP_FAULT:
                    result.fault = GuestFault(13, 0, None)
                    return result
                if hpa == GUEST_FAULT:       # delivered to the guest without an exit (TDP)
                    self.deliver_guest_fault(err, addr)
                    result.fault = self.take_exception()
                    return result
                self.stats["exits"] += 1
                if vm.trace.enabled:
                    trace_page_fault_exit(self, addr, err)
                # handle_ept_misconfig's !is_guest_mode(): L2's ngpa is not an address of L1's bus.
                if err == PFERR_RSVD_MASK and vm.fast_mmio and not self.mmu_is_nested \
                        and vm.fast_mmio_bus.ranges and vm.fast_mmio_bus.write(addr, 0, 0):
                    # handle_ept_misconfig: a length-0 ioeventfd took it; the instruction is skipped.
                    self.counters["fast_mmio"] += 1
                    if vm.trace.enabled:
                        vm.trace.emit("kvm_fast_mmio", gpa=addr)
                        vm.trace.emit("kvm_entry", vcpu_id=self.id, rip=self.rip)
                    return result
                r = kvm_mmu_page_fault(self, addr, err)
                if vm.trace.enabled and r != RET_PF_EMULATE:
                    vm.trace.emit("kvm_entry", vcpu_id=self.id, rip=self.rip)
                if self.pending_nested_exit is not None:
                    return self._nested_exit(result)
                if self.pending_exception is not None:
                    result.fault = self.take_exception()
                    return result
                if r == RET_PF_EMULATE and vm.retry_pf_emulation and retry_instruction(self, addr):
                    # Unprotected and re-entered: the guest executes the instruction again.
                    self.stats["insn_emulation"] += 1
                    if vm.trace.enabled:
                        vm.trace.emit("kvm_emulate_insn", csbase=0, rip=self.rip, insn=self.insn_bytes,
                                      mode="prot64", failed=False)
                        vm.trace.emit("kvm_entry", vcpu_id=self.id, rip=self.rip)
                    continue
                if r == RET_PF_EMULATE and self.defer_emulation:
                    self.stats["insn_emulation"] += 1
                    if vm.trace.enabled:
                        vm.trace.emit("kvm_emulate_insn", rip=gva, size=size, write=write)
                    result.emulate = True
                    return result
                if r == RET_PF_EMULATE:
                    emulate_access(self, gva, size, pfec, write, data, addr, self._gpa_available(err), result)
                    if vm.trace.enabled:
                        vm.trace.emit("kvm_entry", vcpu_id=self.id, rip=self.rip)
                    if self.pending_nested_exit is not None:
                        return self._nested_exit(result)
                    return result
                mmu = self.mmu
                sp = mmu.root_sp
                if self.requests or sp is None or not mmu.root_hpa or sp.invalid \
                        or sp.mmu_valid_gen != mmu.kvm.mmu_valid_gen:
                    self.process_requests()
                attempts += 1
                if attempts == _MAX_ENTRIES:
                    raise KvmBug(f"access to {pgva:#x} faulted {_MAX_ENTRIES} times without progress")
        self._do_access(pieces, hpas, write, data, result)
        return result

    def _gpa_available(self, err: int) -> bool:
        """x86_emulate_instruction: may the emulator take a direct MMU's fault address as the gpa of
        the data?  Mainline KVM always does; that is wrong when the fault was on a guest page-table
        access (the address is the table's), which only kvm_deviations reproduces."""
        if not self.mmu.direct:          # x86_emulate_instruction tests root_role.direct too
            return False
        if self.vm.kvm_deviations:
            return True
        return not err & PFERR_GUEST_PAGE_MASK and self.cpu.exit_final

    def _do_access(self, pieces: tuple[tuple[int, int], ...], hpas: list[int], write: bool, data: bytes,
                   result: AccessResult) -> None:
        mem = self.vm.host.mem
        if len(hpas) == 1:
            if write:
                mem.write_bytes(hpas[0], data)
            else:
                result.value = int.from_bytes(mem.read_bytes(hpas[0], pieces[0][1]), "little")
            return
        if write:
            pos = 0
            for (_, n), hpa in zip(pieces, hpas, strict=True):
                mem.write_bytes(hpa, data[pos:pos + n])
                pos += n
            return
        out = b"".join(mem.read_bytes(hpa, n) for (_, n), hpa in zip(pieces, hpas, strict=True))
        result.value = int.from_bytes(out, "little")

    # -- performance (issue 7): the full path of access(), and many accesses in one call ---------------
    def _access_full(self, gva: int, size: int, kind: str, value: int | bytes | None, cpl: int | None,
                     implicit: bool) -> AccessResult:
        """access() in general: argument checks, then the run loop with the access's CPL in force."""
        check_access_args(gva, size, kind, value, cpl, implicit)
        if cpl is None:
            cpl = self.cpl
        write = kind == "write"
        if write:
            if isinstance(value, (bytes, bytearray)):
                data = bytes(value)
            else:
                data = value.to_bytes(size, "little")  # type: ignore[union-attr]  # check_access_args: an int
        else:
            data = b""
        pfec = (PFERR_WRITE_MASK if write or kind == "rmw" else 0) | (PFERR_FETCH_MASK if kind == "fetch" else 0)
        if cpl == 3 and not implicit:
            pfec |= PFERR_USER_MASK
        if implicit:
            pfec |= PFERR_IMPLICIT_ACCESS
        saved_cpl, self.cpl = self.cpl, cpl
        try:
            return self._access(gva, size, write, data, pfec)
        finally:
            self.cpl = saved_cpl

    def run_accesses(self, ops: list | tuple, values: list | None = None, start: int = 0,
                     stop: int | None = None) -> tuple[int, AccessResult | None]:
        """Many guest accesses in one call: ops[start:stop], each run exactly as `access(*op)` would
        run it, in order.  An op is the argument tuple of access(): (gva, size, kind[, value[, cpl[,
        implicit]]]); a DecodedAccesses (kvmmu.hw.cpu) holds ops decoded once for many replays.

        Returns (stop, None); or, at the first access that ends in a fault delivered to the guest or
        in an exit to L1, (its index, its AccessResult), and the ops after it are not run.  With
        `values` (a list), the value of every completed access is appended (None for writes).
        MMIO exits reach vm.mmio_handler as usual; their records are not returned.

        Runs of TLB hits are left to the CPU, with KVM's entry checks (no request pending, a valid
        root) made once per run: nothing that happens in a run of TLB hits can change them.
        """
        if type(start) is not int or start < 0:
            raise InvalidArgument("start", start, "start is an op index, an int >= 0")
        if stop is not None and (type(stop) is not int or stop < 0):
            raise InvalidArgument("stop", stop, "stop is an op index, an int >= 0, or None")
        if values is not None and not isinstance(values, list):
            raise InvalidArgument("values", values, "values is a list (the completed values are appended) or None")
        batch = ops if isinstance(ops, DecodedAccesses) else DecodedAccesses(ops)
        raw = batch.ops
        n = len(raw) if stop is None else min(stop, len(raw))
        if batch.wide and not self.efer & EFER_LMA:
            # The one state-dependent argument rule: accesses cannot change the paging mode, so a
            # batch is refused whole, before any op runs, as a bad argument anywhere refuses it.
            for j in batch.wide:
                if start <= j < n:
                    raise InvalidArgument("gva", raw[j][0], "linear addresses are 32 bits wide outside long mode")
        i = start
        cpu = self.cpu
        while i < n:
            mmu = self.mmu
            sp = mmu.root_sp
            if not self.requests and sp is not None and mmu.root_hpa and not sp.invalid \
                    and sp.mmu_valid_gen == mmu.kvm.mmu_valid_gen:
                j = cpu.run_decoded(batch, i, n, self.cpl, values)
                if j > i:
                    self.vm.trace.current_vcpu = self.id
                    i = j
                    if i == n:
                        break
            r = self.access(*raw[i])
            if r.fault is not None or r.l1_exit is not None:
                return i, r
            if values is not None:
                values.append(r.value)
            i += 1
        return n, None

    def __repr__(self) -> str:
        return f"<vcpu {self.id} cr0={self.cr0:#x} cr3={self.cr3:#x} cr4={self.cr4:#x} efer={self.efer:#x}>"


__all__ = ["ACCESS_KINDS", "ACCESS_SIZES", "AccessResult", "GuestFault", "Vcpu", "PT64_ADDR_MASK"]
