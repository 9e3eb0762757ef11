"""Emulation of a faulting access (x86_emulate_instruction / emulator_read_write) and the exit to
userspace (KVM_EXIT_MMIO): gva->gpa via the MMIO cache or a guest walk, RAM or MMIO, the in-kernel
io bus in <= 8-byte pieces, then fragments that exit to the VMM 8 bytes at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..arch.bits import (
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    PFERR_FETCH_MASK,
    PFERR_IMPLICIT_ACCESS,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    X86_CR4_PAE,
)
from ..arch.permission import permission_fault
from ..arch.walker import Walk
from .exceptions import GuestFault

if TYPE_CHECKING:
    from ..arch.modes import PagingContext
    from .vcpu import AccessResult, Vcpu

UD_VECTOR = 6

APIC_DEFAULT_PHYS_BASE = 0xFEE00000
KVM_EXIT_MMIO = 6
_EMULATOR_ACCESS = PFERR_WRITE_MASK | PFERR_USER_MASK | PFERR_FETCH_MASK | PFERR_IMPLICIT_ACCESS


@dataclass
class MmioExit:
    """One KVM_EXIT_MMIO: what userspace saw in kvm_run.mmio."""

    phys_addr: int
    len: int
    is_write: bool
    data: bytes

    @property
    def value(self) -> int:
        return int.from_bytes(self.data, "little")

    def __repr__(self) -> str:
        d = "W" if self.is_write else "R"
        return f"MmioExit({d} {self.phys_addr:#x} len={self.len} data={self.data.hex()})"


def vcpu_is_mmio_gpa(vcpu: Vcpu, gpa: int) -> bool:
    return (gpa & ~0xFFF) == APIC_DEFAULT_PHYS_BASE or vcpu.mmio_cache.match_gpa(gpa)


def cached_mmio_gpa(vcpu: Vcpu, gva: int, access: int) -> int | None:
    """The MMIO gva cache's answer in vcpu_mmio_gva_to_gpa: the gpa if the cache holds `gva` and its
    cached rights allow `access` (PFERR_* bits), else None (the caller walks the guest tables).

    Only data accesses ask the cache: KVM's instruction fetches and implicit (system) accesses
    always walk.  KVM checks the cached rights with protection key 0, which is right for KVM (it
    offers PKU only with TDP, where the gva cache is unused); the model also lets a shadow-paging
    guest set CR4.PKE, so a user page under active protection keys is walked too (its key is not
    cached)."""
    cache = vcpu.mmio_cache
    if access & (PFERR_FETCH_MASK | PFERR_IMPLICIT_ACCESS) or not cache.match_gva(gva):
        return None
    ctx: PagingContext = vcpu.mmu.cpu_role  # type: ignore[assignment]  # built before any access; no cast() call
    if ctx.mode.root_level:
        if ctx.pkeys_active and cache.mmio_access & ACC_USER_MASK:
            return None
        if access & PFERR_WRITE_MASK and not cache.mmio_access & ACC_WRITE_MASK and not vcpu.vm.kvm_deviations:
            # The cached rights of a page first reached by a read lack W when its PTE is clean
            # (protect_clean_gpte).  With CR0.WP=0 a supervisor write passes KVM's check anyway and
            # never walks, so the PTE's D bit is never set; the SDM sets it.  Walk instead.
            return None
        if permission_fault(ctx, access, cache.mmio_access, vcpu.ac, vcpu.pkru, 0):
            return None
    vcpu.counters["mmio_cache_hits"] += 1
    return (cache.mmio_gfn << 12) | (gva & 0xFFF)


def gva_to_gpa(vcpu: Vcpu, gva: int, access: int, gpa_hint: int | None = None,
               inject: bool = True) -> tuple[int, bool] | int:
    """The emulator's gva -> gpa for one page of an access with PFERR_* bits `access`: (gpa, is_mmio),
    or, when the translation faults, the #PF error code (-1 when the nested MMU sent the fault to
    L2 or L1 itself).  This is the one translation of both emulators: emulator_read_write_onepage's
    steps, then mmu->gva_to_gpa as kvm_mmu_gva_to_gpa_{read,write,fetch,system} call it.

    ``gpa_hint``: the fault address a direct MMU hands the emulator (x86_emulate_instruction's
    gpa_available): taken for the page with the same offset, without a walk or the gva cache.
    With L2 running, mmu->gva_to_gpa is the nested MMU's: L2's tables through L1's EPT, and never
    the gva cache (it caches L1 addresses).  Otherwise the MMIO gva cache (data accesses only), then
    the guest walk.  ``inject``: a failed walk queues the #PF (kvm_inject_emulated_page_fault);
    False while KVM delivers an event itself, where the failure escalates instead (#DF)."""
    if gpa_hint is not None and (gpa_hint & 0xFFF) == (gva & 0xFFF):
        return gpa_hint, vcpu_is_mmio_gpa(vcpu, gpa_hint)
    mmu = vcpu.walk_mmu
    if mmu is vcpu.mmu:
        # (While L2 runs, never the gva cache: it caches L1 addresses.)
        gpa = cached_mmio_gpa(vcpu, gva, access)
        if gpa is not None:
            trace = vcpu.vm.trace
            if trace.enabled:
                trace.emit("vcpu_match_mmio", gva=gva, gpa=gpa, write=bool(access & PFERR_WRITE_MASK),
                           gpa_match=False)
            return gpa, True
    t = mmu.gva_to_gpa(mmu, gva, access)
    if t is None:
        return -1                       # nested_mmu delivered the fault (to L2, or an EPT exit to L1)
    if isinstance(t, Walk):
        if inject:
            mmu.inject_page_fault(mmu, gva, t)
        return t.error_code
    return t, vcpu_is_mmio_gpa(vcpu, t)


def fetch_fails(vcpu: Vcpu, translated: list[tuple[int, bool]]) -> bool:
    """kvm_fetch_guest_virt reads instruction bytes with kvm_vcpu_read_guest_page, which knows guest
    RAM only: a page of the fetch that is MMIO (or no usable memslot) makes it fail, and with it the
    decode (X86EMUL_IO_NEEDED -> EMULATION_FAILED).  Hardware fetches from MMIO, so only
    kvm_deviations keeps KVM's failure."""
    if not vcpu.vm.kvm_deviations:
        return False
    for gpa, is_mmio in translated:
        slot = None if is_mmio else vcpu.gfn_to_memslot(gpa >> 12)
        if slot is None or slot.invalid:
            return True
    return False


def emulation_failure(vcpu: Vcpu, cpl: int) -> tuple[GuestFault, str | None]:
    """handle_emulation_failure: insn_emulation_fail + 1 and #UD queued for the guest, with
    KVM_EXIT_INTERNAL_ERROR (suberror KVM_INTERNAL_ERROR_EMULATION) as well at CPL0 outside guest
    mode; returns the #UD and that suberror (None: the guest just takes the #UD)."""
    vcpu.stats["insn_emulation_fail"] += 1
    internal = "KVM_INTERNAL_ERROR_EMULATION" if cpl == 0 and not vcpu.mmu_is_nested else None
    return GuestFault(UD_VECTOR, 0, None), internal


def emulate_access(vcpu: Vcpu, gva: int, size: int, pfec: int, write: bool, data: bytes, cr2_or_gpa: int,
                   direct: bool, result: AccessResult) -> None:
    """Emulate one access (PFERR_* bits `pfec`) that faulted with RET_PF_EMULATE; fills
    result.value / exits / fault.  A read with W in `pfec` is the load of a read-modify-write (access
    kind "rmw"): the CPU faulted on it for writing, but KVM's emulator reads the operand with a read
    translation (the store follows as an access of its own)."""
    access = pfec & _EMULATOR_ACCESS if write else pfec & _EMULATOR_ACCESS & ~PFERR_WRITE_MASK
    vm = vcpu.vm
    vcpu.stats["insn_emulation"] += 1
    vcpu.counters["emulated_accesses"] += 1
    if vm.trace.enabled:
        vm.trace.emit("kvm_emulate_insn", csbase=0, rip=vcpu.rip, insn=vcpu.insn_bytes, mode=_emul_mode(vcpu),
                      failed=False)
    parts = pieces(gva, size)
    gpa_hint = cr2_or_gpa if direct and not vcpu.mmu_is_nested else None
    out = None if write else bytearray(size)          # (a write never fills it)
    fragments: list[tuple[int, int, int]] = []      # (gpa, offset into data, length)
    # KVM's emulator_read_write translates and performs one page at a time, so when the second page
    # faults the first has already been written (RAM, in-kernel devices).  The SDM gives a faulting
    # access no effect; unless kvm_deviations, every page is translated before anything is done.
    # (A fetch is KVM's instruction fetch: it translates every page before reading any.)
    fetch = bool(access & PFERR_FETCH_MASK)
    interleave = vm.kvm_deviations and not fetch
    translated: list[tuple[int, bool]] = []
    for pgva, _off, _plen in parts:
        t = gva_to_gpa(vcpu, pgva, access, gpa_hint)
        gpa_hint = None
        if isinstance(t, int):
            result.fault = vcpu.take_exception()
            return                      # (or a nested exit to L1, which the caller reports)
        translated.append(t)
        if interleave:
            _, off, n = parts[len(translated) - 1]
            perform_piece(vcpu, t, off, n, write, data, out, fragments)
    if fetch and fetch_fails(vcpu, translated):
        result.fault, result.internal_error = emulation_failure(vcpu, vcpu.cpl)
        return
    if not interleave:
        for (_, off, n), t in zip(parts, translated, strict=True):
            perform_piece(vcpu, t, off, n, write, data, out, fragments)
    if fragments:
        result.mmio_exit_records.extend(exit_to_vmm(vcpu, fragments, write, data, out))
    if out is not None:
        result.value = int.from_bytes(out, "little")


def _emul_mode(vcpu: Vcpu) -> str:
    """The emulator's mode as kvm_emulate_insn names it (the model's vCPUs run 64-bit or 32-bit code)."""
    if not vcpu.cr0 & 1:
        return "real"
    return "prot64" if vcpu.efer & 0x400 else "prot32"


def pieces(gva: int, size: int) -> list[tuple[int, int, int]]:
    """(gva, offset, length) of each page an access touches (at most two): emulator_read_write
    splits at the page boundary and handles each page on its own."""
    first = 0x1000 - (gva & 0xFFF)
    if first >= size:
        return [(gva, 0, size)]
    return [(gva, 0, first), ((gva + first) & ((1 << 64) - 1), first, size - first)]


def perform_piece(vcpu: Vcpu, t: tuple[int, bool], offset: int, plen: int, write: bool, data: bytes,
                  out: bytearray | None, fragments: list[tuple[int, int, int]], tracked: bool = True,
                  ram_only: bool = False) -> bool:
    """emulator_read_write_onepage at the piece's (gpa, is_mmio) `t`: RAM, then in-kernel devices;
    the rest becomes KVM_EXIT_MMIO fragments.  False if the piece is not (writable) RAM and
    ``ram_only`` (kvm_write_guest_virt_system, which has no MMIO path): nothing is done then.
    ``tracked``: a RAM write goes through kvm_mmu_track_write (the emulator's writes; not KVM's
    own event-delivery frames)."""
    gpa, is_mmio = t
    chunk = data[offset:offset + plen] if write else b""
    if not is_mmio and ram_access(vcpu, gpa, plen, write, chunk, out, offset, tracked):
        return True
    if ram_only:
        return False
    # With no in-kernel device registered the io bus handles nothing (_iobus would return 0).
    done = _iobus(vcpu, gpa, plen, write, chunk, out, offset) if vcpu.vm.iobus.ranges else 0
    if done < plen:
        fragments.append((gpa + done, offset + done, plen - done))
    return True


def ram_access(vcpu: Vcpu, gpa: int, n: int, write: bool, chunk: bytes, out: bytearray | None, at: int,
               tracked: bool = True) -> bool:
    """kvm_vcpu_read_guest / write_guest (+ kvm_mmu_track_write); False if no writable RAM is there."""
    vm = vcpu.vm
    slot = vcpu.gfn_to_memslot(gpa >> 12)
    if slot is None or slot.invalid or (write and slot.readonly):
        return False
    hva = slot.gfn_to_hva(gpa >> 12) | (gpa & 0xFFF)
    vm.host_touch(hva, write)
    if write:
        vm.host.mem.write_bytes(hva, chunk)
        vm.mark_page_dirty(slot, gpa >> 12)
        if tracked:
            vm.mmu.track_write(gpa, n, pae=bool(vcpu.cr4 & X86_CR4_PAE))
    else:
        assert out is not None
        out[at:at + n] = vm.host.mem.read_bytes(hva, n)
    return True


def exit_to_vmm(vcpu: Vcpu, fragments: list[tuple[int, int, int]], write: bool, data: bytes,
                out: bytearray | None, on_exit: Callable[[], None] | None = None) -> list[MmioExit]:
    """One x86_emulate_instruction ending with mmio_needed: mmio_exits + 1, then one KVM_EXIT_MMIO
    per <= 8 bytes of each fragment (gpa, offset into data, length); a read's data land in `out`.
    ``on_exit`` runs before each exit (the software CPU's host profiles end the entry there)."""
    vcpu.stats["mmio_exits"] += 1
    records: list[MmioExit] = []
    for gpa, off, length in fragments:
        pos = 0
        while pos < length:
            n = length - pos if length - pos < 8 else 8
            if on_exit is not None:
                on_exit()
            payload = data[off + pos:off + pos + n] if write else b""
            exit_ = vcpu.vm.vmm_mmio(vcpu, gpa + pos, n, write, payload)
            records.append(exit_)
            if out is not None:
                out[off + pos:off + pos + n] = exit_.data
            pos += n
    return records


def _iobus(vcpu: Vcpu, gpa: int, n: int, write: bool, chunk: bytes, out: bytearray | None, at: int) -> int:
    """vcpu_mmio_read/write: in-kernel devices in <= 8-byte pieces; stops at the first unhandled one."""
    vm = vcpu.vm
    buf = out if out is not None else bytearray()      # (a read always passes `out`)
    done = 0
    while done < n:
        k = min(8, n - done)
        if write:
            if not vm.iobus.write(gpa + done, k, int.from_bytes(chunk[done:done + k], "little")):
                break
        else:
            v = vm.iobus.read(gpa + done, k)
            if v is None:
                break
            buf[at + done:at + done + k] = (v & ((1 << (8 * k)) - 1)).to_bytes(k, "little")
        vcpu.counters["iobus_handled"] += 1
        if vm.trace.enabled:
            vm.trace.emit("kvm_mmio", type=2 if write else 1, len=k, gpa=gpa + done,
                          val=int.from_bytes(chunk[done:done + k], "little") if write
                          else int.from_bytes(buf[at + done:at + done + k], "little"))
        done += k
    return done
