"""The software CPU's emulator (kvm/soft_emulator.py) and the fault path's (kvm/emulate.py) share one
translation and one rule for an instruction fetch from MMIO.  Expected values from KVM's source:

- arch/x86/kvm/x86.c, kvm_fetch_guest_virt reads instruction bytes with kvm_vcpu_read_guest_page,
  which fails on a gpa no memslot backs (MMIO); the decode then fails (EMULATION_FAILED);
- arch/x86/kvm/x86.c, handle_emulation_failure: insn_emulation_fail + 1, #UD queued, and
  KVM_EXIT_INTERNAL_ERROR (suberror KVM_INTERNAL_ERROR_EMULATION) only when the vCPU is at CPL0
  and not in guest mode; at CPL3 the guest just takes the #UD.
"""

from __future__ import annotations

import pytest

from kvmmu.guest.pagetables import RW, US, A, D, P
from kvmmu.hw.x86cpu import UD, CpuFault, Stop
from kvmmu.kvm.soft_emulator import Emulator
from tests.fuzz.test_found_bugs import LONG_MODE, MMIO, Guest


def _mmio_code_guest(mmu: str, deviations: bool) -> Guest:
    g = Guest(mmu, kvm_deviations=deviations)
    g.pt.map(0x40_0000, MMIO, flags=P | RW | US | A | D)
    g.vcpu.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    return g


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
@pytest.mark.parametrize("cpl", [0, 3])
def test_emulator_fetch_from_mmio_is_handle_emulation_failure(mmu: str, cpl: int) -> None:
    g = _mmio_code_guest(mmu, deviations=True)
    v = g.vcpu
    exits = v.stats["mmio_exits"]
    if cpl == 0:
        with pytest.raises(Stop) as stop:
            Emulator(v).fetch(0x40_0000, 4, cpl)
        assert stop.value.reason == "internal_error"
        assert "KVM_INTERNAL_ERROR_EMULATION" in str(stop.value)
    else:
        with pytest.raises(CpuFault) as fault:
            Emulator(v).fetch(0x40_0000, 4, cpl)
        assert fault.value.vector == UD, "CPL3: the guest takes the #UD, no exit to userspace"
    assert v.stats["insn_emulation_fail"] == 1
    assert v.stats["mmio_exits"] == exits, "kvm_fetch_guest_virt never reaches the MMIO path"


@pytest.mark.parametrize("cpl", [0, 3])
def test_both_emulators_agree_on_a_fetch_from_mmio(cpl: int) -> None:
    """The fault path (vcpu.access of kind fetch) and the software CPU's emulator give one answer."""
    a = _mmio_code_guest("shadow", deviations=True)
    r = a.vcpu.access(0x40_0000, 4, "fetch", cpl=cpl)
    b = _mmio_code_guest("shadow", deviations=True)
    try:
        Emulator(b.vcpu).fetch(0x40_0000, 4, cpl)
        got: tuple[int | None, bool] = (None, False)
    except Stop:
        got = (UD, True)
    except CpuFault as f:
        got = (f.vector, False)
    assert r.fault is not None
    assert got == (r.fault.vector, r.internal_error is not None)
    assert a.vcpu.stats["insn_emulation_fail"] == b.vcpu.stats["insn_emulation_fail"] == 1


def test_emulator_fetch_from_mmio_reads_the_device_without_kvm_deviations() -> None:
    """The SDM lets the CPU execute from MMIO: the bytes come from the device (one KVM_EXIT_MMIO)."""
    g = _mmio_code_guest("shadow", deviations=False)
    v = g.vcpu
    assert Emulator(v).fetch(0x40_0000, 4, 0) == (0x77).to_bytes(4, "little")
    assert v.stats["insn_emulation_fail"] == 0
    assert v.stats["mmio_exits"] == 1


def test_emulator_translation_fault_is_the_cpus_pf_with_the_walks_error_code() -> None:
    """A not-present PTE read at CPL3: #PF with U=1, W=0, P=0 (SDM Vol. 3A 4.7), queued by KVM first
    (pf_guest) unless KVM is delivering an event itself."""
    g = _mmio_code_guest("shadow", deviations=True)
    v = g.vcpu
    emu = Emulator(v)
    for inject in (True, False):
        emu.inject = inject
        injected = v.stats["pf_guest"]
        with pytest.raises(CpuFault) as fault:
            emu.read(0x80_0000, 4, cpl=3)
        assert (fault.value.vector, fault.value.error_code, fault.value.cr2) == (14, 0x4, 0x80_0000)
        assert v.stats["pf_guest"] - injected == (1 if inject else 0)
        assert v.pending_exception is None
