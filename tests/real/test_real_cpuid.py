"""CPUID on real vCPUs: the real backend installs KVM_GET_SUPPORTED_CPUID like a VMM.

Expected values: KVM's code (``cpuid_query_maxphyaddr`` answers 36 without a leaf 0x80000008,
else EAX[7:0] of it) and measurements on this machine's /dev/kvm (docs/real-kvm.md, "CPUID").
"""

from __future__ import annotations

import pytest

from kvmmu.errors import InvalidArgument
from kvmmu.real import CpuidEntry, RealVM, available, host_guest_paging, unavailable_reason
from kvmmu.real import ioctls as K
from kvmmu.real.cpuid import for_vcpu, gbpages, maxphyaddr, pack_cpuid2

needs_kvm = pytest.mark.skipif(not available(), reason=f"needs a usable /dev/kvm: {unavailable_reason()}")


def test_maxphyaddr_follows_cpuid_query_maxphyaddr() -> None:
    """No table, no 0x80000008, or a max extended leaf below it: 36; else EAX[7:0] (46 = 0x2e)."""
    top = CpuidEntry(0x8000_0000, eax=0x8000_0008)
    assert maxphyaddr(None) == maxphyaddr(()) == 36
    assert maxphyaddr((top,)) == 36
    assert maxphyaddr((CpuidEntry(0x8000_0000, eax=0x8000_0007), CpuidEntry(0x8000_0008, eax=0x302E))) == 36
    assert maxphyaddr((top, CpuidEntry(0x8000_0008, eax=0x302E))) == 46
    assert gbpages((CpuidEntry(0x8000_0001, edx=1 << 26),)) and not gbpages((CpuidEntry(0x8000_0001),))


def test_cpuid2_layout_and_apic_id() -> None:
    """struct kvm_cpuid2: u32 nent, u32 pad, then 40-byte entries; each vCPU gets its APIC ID in
    leaf 1 EBX[31:24] and leaf 0xB EDX (the rest of the table unchanged)."""
    table = (CpuidEntry(1, ebx=0x0102_0800), CpuidEntry(0xB, flags=1, edx=0), CpuidEntry(7, 0, 1, ebx=5))
    mine = for_vcpu(table, 3)
    assert mine[0].ebx == 0x0302_0800 and mine[1].edx == 3 and mine[2] == table[2]
    buf = pack_cpuid2(mine)
    assert len(buf) == 8 + 3 * 40 and K.KVM_CPUID2_HEADER.unpack_from(buf) == (3, 0)
    assert K.KVM_CPUID_ENTRY2.unpack_from(buf, 8 + 80)[:5] == (7, 0, 1, 0, 5)


def test_realvm_refuses_a_bad_cpuid_argument() -> None:
    if not available():
        pytest.skip(f"needs a usable /dev/kvm: {unavailable_reason()}")
    with pytest.raises(InvalidArgument, match="cpuid"):
        RealVM(cpuid="host")  # type: ignore[arg-type]


def _guest_cpuid_80000008(cpuid: str | None) -> tuple[int, int]:
    from kvmmu.real import FlatLongMode
    code = (b"\xb8\x08\x00\x00\x80"                 # mov eax, 0x80000008
            b"\x0f\xa2"                             # cpuid
            b"\x48\xbf" + (0x20000).to_bytes(8, "little") +   # mov rdi, 0x20000
            b"\x89\x07"                             # mov [rdi], eax
            b"\xf4")                                # hlt
    with RealVM(cpuid=cpuid) if cpuid is None else RealVM() as vm:
        vm.set_user_memory_region(0, 0, 2 << 20)
        vcpu = vm.create_vcpu()
        FlatLongMode().install(vm, vcpu)
        vm.write_phys(0x40000, code)
        vcpu.set_regs(rip=0x40000, rsp=0x9000, rflags=2)
        assert vcpu.run().reason == "hlt"
        return int.from_bytes(vm.read_phys(0x20000, 4), "little"), vm.guest_maxphyaddr


@pytest.mark.realkvm
@needs_kvm
def test_default_realvm_installs_the_supported_cpuid() -> None:
    """The guest's CPUID 0x80000008 is the supported one: EAX[7:0] = the width KVM uses for it."""
    eax, width = _guest_cpuid_80000008("supported")
    assert eax & 0xFF == width == host_guest_paging()[0]
    assert width > 36


@pytest.mark.realkvm
@needs_kvm
def test_realvm_without_cpuid_keeps_kvms_36_bit_default() -> None:
    """RealVM(cpuid=None): no KVM_SET_CPUID2, the guest has no leaf 0x80000008 (reads 0) and KVM
    uses 36 bits."""
    eax, width = _guest_cpuid_80000008(None)
    assert (eax & 0xFF, width) == (0, 36)
