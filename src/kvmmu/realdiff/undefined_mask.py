"""The SDM-undefined bits of a model run, as masks the differential runner applies to both sides.

The software CPU tracks which RFLAGS bits are undefined and where their images went (registers,
linear addresses: ``kvmmu.hw.undefined_flags``).  Here they become what the comparison needs: a mask
per guest-physical byte (the linear addresses translated through the guest's final page tables,
without side effects), a mask per register, and the list of instructions that consumed an undefined
value.  Masked bits are cleared on the model's and on the real observation alike, so neither the
model's choice nor the host CPU's shows up as a difference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import KvmBug

if TYPE_CHECKING:
    from ..hw.x86cpu import X86Cpu
    from ..kvm.vcpu import Vcpu
    from ..kvm.vm import VM

_X86_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
              "r13", "r14", "r15")


def collect(cpu: X86Cpu, vcpu: Vcpu) -> tuple[dict[int, int], dict[str, int], list[str]]:
    """(gpa byte -> undefined bits, register -> undefined bits, uses) at the end of a model run."""
    from ..arch.walker import walk

    track = cpu.undefined
    regs = {_X86_ORDER[i]: bits for i, bits in track.regs.items() if bits}
    if track.undef:
        regs["rflags"] = track.undef
    mem: dict[int, int] = {}
    pages: dict[int, int | None] = {}
    reader = _QuietReader(vcpu.vm)
    for gva, bits in track.mem.items():
        page = gva & ~0xFFF
        if page not in pages:
            ctx = vcpu.mmu.cpu_role
            if ctx is None:
                raise KvmBug(f"undefined flags were stored at gva {gva:#x}, but vcpu{vcpu.id} has no paging context")
            w = walk(ctx, reader, vcpu.cr3, page)
            pages[page] = None if w.fault else w.gpa & ~0xFFF
        base = pages[page]
        if base is not None:
            mem[base | (gva & 0xFFF)] = bits
    return mem, regs, list(track.uses)


class _QuietReader:
    """Guest page-table reads through the memslots with no side effect (no A/D update, no count)."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm

    def read_pte(self, gpa: int, size: int) -> int:
        slot = self.vm.memslots.spaces[0].search(gpa >> 12)
        if slot is None or slot.invalid:
            return -1
        return self.vm.read_guest_quiet(gpa, size)

    def cmpxchg_pte(self, gpa: int, size: int, old: int, new: int) -> bool:
        return True


def mask_memory(memory: dict[int, bytes], undefined: dict[int, int]) -> dict[int, bytes]:
    """``memory`` (page gpa -> bytes) with the undefined bits cleared; pages that become zero are
    dropped, as the capture drops zero pages."""
    if not undefined:
        return memory
    out = dict(memory)
    by_page: dict[int, list[tuple[int, int]]] = {}
    for gpa, bits in undefined.items():
        by_page.setdefault(gpa & ~0xFFF, []).append((gpa & 0xFFF, bits))
    for page, cells in by_page.items():
        if page not in out:
            continue
        data = bytearray(out[page])
        for off, bits in cells:
            data[off] &= ~bits & 0xFF
        if any(data):
            out[page] = bytes(data)
        else:
            del out[page]
    return out


def mask_regs(regs: dict[str, int], undefined: dict[str, int]) -> dict[str, int]:
    return {name: value & ~undefined.get(name, 0) for name, value in regs.items()}


__all__ = ["collect", "mask_memory", "mask_regs"]
