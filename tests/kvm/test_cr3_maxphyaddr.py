"""CR3 against the guest MAXPHYADDR.

Expected behaviour from KVM's code and the SDM, measured on the real /dev/kvm (docs/real-kvm.md,
"CR3 and the guest MAXPHYADDR"):

- ``kvm_is_valid_sregs``: with EFER.LME and CR0.PG, KVM_SET_SREGS fails with EINVAL unless
  ``kvm_vcpu_is_legal_cr3`` — no bit from MAXPHYADDR to 63 set (bit 63 included; only LAM's bits
  61/62 are exempt, and the model has no LAM).  Measured: bit W-1 accepted, bits W, 51, 52, 61, 62,
  63 refused, for W = 48 (supported CPUID) and W = 36 (no CPUID).
- ``kvm_set_cr3`` (MOV to CR3): the same rule, a #GP; CR4.PCIDE makes bit 63 the no-flush operand
  bit (stripped, never stored); writing the current value is not checked.  SDM Vol. 2B MOV CR3:
  #GP(0) for a reserved bit.  Measured: corpus ``cr3_above_maxphyaddr`` (three #GP(0), RIP on the MOV).
"""

from __future__ import annotations

import pytest

from kvmmu.arch.bits import X86_CR4_PCIDE
from kvmmu.errors import InvalidArgument
from kvmmu.hw.x86cpu import GP, X86Cpu
from kvmmu.tools.asm import assemble
from tests.fuzz.test_found_bugs import LONG_MODE, Guest

from ..hw.test_x86cpu import CODE, GDT, IDT, STACK, TSS, FlatBus


def _state(v: object) -> tuple[int, ...]:
    return tuple(getattr(v, n) for n in ("cr0", "cr3", "cr4", "efer", "cpl", "rflags"))


@pytest.mark.parametrize("width", [36, 46, 48])
def test_set_sregs_refuses_cr3_bits_above_the_guest_maxphyaddr(width: int) -> None:
    g = Guest("shadow", guest_maxphyaddr=width)
    v = g.vcpu
    v.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    before = _state(v)
    for bit in (width, 51, 52, 61, 62, 63):
        with pytest.raises(InvalidArgument, match=rf"cr3.*bits 63:{width}.*EINVAL"):
            v.set_sregs(cr3=g.pt.cr3 | 1 << bit, cpl=3, rflags=0x202)
        assert _state(v) == before                         # nothing applied, cpl/rflags included
    v.set_sregs(cr3=g.pt.cr3 | 1 << (width - 1))
    assert v.cr3 == g.pt.cr3 | 1 << (width - 1)


def test_set_sregs_checks_cr3_only_in_long_mode() -> None:
    """kvm_is_valid_sregs checks CR3 only when EFER.LME and CR0.PG are both set."""
    g = Guest("shadow", guest_maxphyaddr=36)
    v = g.vcpu
    v.set_sregs(cr3=1 << 40)                               # paging off: accepted, as KVM does
    assert v.cr3 == 1 << 40
    with pytest.raises(InvalidArgument, match="cr3"):
        v.set_sregs(**LONG_MODE)                           # now long mode with the same CR3


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
def test_mov_cr3_refuses_bits_above_the_guest_maxphyaddr(mmu: str) -> None:
    g = Guest(mmu, guest_maxphyaddr=46)
    v = g.vcpu
    v.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    exits = v.stats["exits"]
    for bit in (46, 51, 63):
        with pytest.raises(InvalidArgument, match="kvm_set_cr3"):
            v.write_cr3(g.pt.cr3 | 1 << bit)
    assert v.cr3 == g.pt.cr3 and v.stats["exits"] == exits   # refused before the exit counts
    v.write_cr3(g.pt.cr3 | 1 << 45)
    assert v.cr3 == g.pt.cr3 | 1 << 45


def test_pcide_makes_bit_63_the_no_flush_bit() -> None:
    """kvm_set_cr3 strips X86_CR3_PCID_NOFLUSH with CR4.PCIDE; bit 62 stays reserved."""
    g = Guest("shadow", guest_maxphyaddr=46)
    v = g.vcpu
    v.set_sregs(cr3=g.pt.cr3, **{**LONG_MODE, "cr4": LONG_MODE["cr4"] | X86_CR4_PCIDE})
    v.write_cr3(g.pt.cr3 | 1 << 63)
    assert v.cr3 == g.pt.cr3
    with pytest.raises(InvalidArgument, match="cr3"):
        v.write_cr3(g.pt.cr3 | 1 << 62)


class RefusingBus(FlatBus):
    """A bus whose KVM refuses every CR3 above bit 45 (as vcpu.write_cr3 does for MAXPHYADDR 46)."""

    def write_cr(self, cpu: X86Cpu, cr: int, value: int) -> None:
        if cr == 3 and value >> 46:
            raise InvalidArgument("cr3", value, "above MAXPHYADDR")


def test_the_software_cpu_turns_a_refused_mov_cr3_into_gp0() -> None:
    """SDM MOV CR3: #GP(0), CR3 unchanged, RIP on the MOV (the fault is delivered there)."""
    bus = RefusingBus()
    src = "mov rax, 0x400000000000 | 0x10000\nmov cr3, rax\nhlt"
    for addr, data in assemble(src, CODE).segments:
        bus.mem[addr:addr + len(data)] = data
    cpu = X86Cpu(bus, rip=CODE, rsp=STACK, rflags=2, cpl=0, cr0=0x80010033, cr3=0x10000, cr4=0x220,
                 efer=0x500, gdt=(GDT, 0x2F), idt=(IDT, 0), tss=(TSS, 0x67))
    cpu.step()
    mov_rip = cpu.rip
    faults: list[tuple[int, int | None, int]] = []
    cpu.deliver = lambda vector, err, cr2, rip: faults.append((vector, err, rip))  # type: ignore[method-assign]
    cpu.step()
    assert faults == [(GP, 0, mov_rip)] and cpu.cr3 == 0x10000
