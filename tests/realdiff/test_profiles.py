"""Host profiles on the model.  Expected values are measurements of the real kvm_pvm host
(docs/spec/kvm-pvm-host.md §2, §4, §6 and docs/real-kvm.md), not the model's output."""

from __future__ import annotations

import pytest

from kvmmu.errors import InvalidArgument
from kvmmu.guest.runtime import Map, Program, WritePhys, build
from kvmmu.kvm.profiles import PROFILES, get_profile
from kvmmu.real import RealVM, available, host_guest_paging
from kvmmu.realdiff import run_model

MMIO = 0xD000_0000
MAPS = (Map(0x60_0000, 0x1000, flags="rw u"), Map(MMIO, 0x1000, flags="rw u"))


def test_the_kvm_pvm_profile_is_an_explicit_option() -> None:
    """kvm-pvm: shadow MMU, mmio_caching=N, CPL0 emulated with batches of 1024, KVM delivers events."""
    p = get_profile("kvm-pvm")
    assert (p.mmu, p.mmio_caching, p.cpl0, p.delivery, p.emul_batch) == ("shadow", "off", "emulated", "kvm", 1024)
    assert {"vmx-ept", "vmx-shadow"} <= set(PROFILES)
    vm = p.make_vm()
    assert (vm.flavour, vm.mmio_caching) == ("shadow", "off")


def test_kvm_pvm_guest_width_is_measured_not_assumed() -> None:
    """The profile's guest MAXPHYADDR / Page1GB are what the real backend's CPUID gives a guest on
    the machine running the test (measured: 48 here, 46 on the December machines), never a constant."""
    p = get_profile("kvm-pvm")
    assert p.guest_maxphyaddr is None and p.guest_gbpages is None
    width, gb, source = host_guest_paging()
    vm = p.make_vm()
    assert (vm.guest_maxphyaddr, vm.guest_gbpages) == (width, gb), source
    if available():
        with RealVM() as real:
            assert real.guest_maxphyaddr == width


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="host profiles are"):
        get_profile("kvm-xen")


def test_cpl0_mmio_writes_are_emulated_without_page_faults() -> None:
    """§4: N MMIO writes at CPL0 -> mmio_exits N, exits N + 1 (hlt), no pf_*, one insn_emulation
    per instruction."""
    prog = Program("p", f"mov rdi, {MMIO:#x}\nmov ecx, 10\nl: mov [rdi], ecx\ndec ecx\njnz l\nhlt", maps=MAPS)
    c = run_model(prog).counters
    assert (c["mmio_exits"], c["exits"], c["pf_taken"], c["insn_emulation"]) == (10, 11, 0, 2 + 30 + 1)


@pytest.mark.parametrize(("instructions", "exits"), [(1024, 1), (1025, 2), (2048, 2), (2049, 3)])
def test_cpl0_emulation_batches_are_1024_instructions(instructions: int, exits: int) -> None:
    """Measured: a run of T emulated instructions ending in hlt has 1 + (T - 1) // 1024 exits."""
    prog = Program("p", "nop\n" * (instructions - 1) + "hlt")
    assert run_model(prog).counters["exits"] == exits


def test_cpl3_mmio_writes_each_take_the_full_fault_path() -> None:
    """§4 (CPL3): with mmio_caching=N every MMIO write is a #PF exit (pf_taken, pf_emulate) and one
    emulation; no MMIO spte is ever created."""
    prog = Program("p", f"mov rdi, {MMIO:#x}\nmov ecx, 10\nl: mov [rdi], ecx\ndec ecx\njnz l\nhlt",
                   maps=MAPS, cpl=3)
    c = run_model(prog).counters
    assert (c["pf_emulate"], c["mmio_exits"], c["pf_mmio_spte_created"]) == (10, 10, 0)
    assert c["pf_taken"] == 10 + 1          # + the code page


def test_cpl0_has_no_tlb() -> None:
    """§2: at CPL0 a PTE edit is effective on the very next access, without INVLPG."""
    prog = Program("p", """
        mov rdx, 0x700000
        mov rbx, [rdx]
        mov rdi, pte(0x700000)
        mov qword [rdi], 0x641007
        mov rcx, [rdx]
        hlt""", maps=(Map(0x70_0000, 0x1000, 0x64_0000, "rw u"),),
        data={0x64_0000: b"\x0a" * 8, 0x64_1000: b"\x0b" * 8})
    obs = run_model(prog)
    assert (obs.regs["rbx"], obs.regs["rcx"]) == (0x0A0A0A0A0A0A0A0A, 0x0B0B0B0B0B0B0B0B)


def test_cpl3_never_sees_a_host_side_edit_of_a_write_protected_table() -> None:
    """Measured (docs/real-kvm.md): a PTE the host edits between runs is not seen at CPL3, and INVLPG
    does not help either: KVM resyncs only *unsync* shadow pages on INVLPG, and a write-protected
    table cannot have changed behind its back — except by the host."""
    base = Program("p", """
        mov rdx, 0x700000
        mov rbx, [rdx]
        hlt
        mov rcx, [rdx]
        mov rdi, rdx
        mov eax, 1
        svc
        mov r8, [rdx]
        hlt""", cpl=3, maps=(Map(0x70_0000, 0x1000, 0x64_0000, "rw u"),),
        data={0x64_0000: b"\x0a" * 8, 0x64_1000: b"\x0b" * 8})
    pte = build(base).pte(0x70_0000)
    prog = Program(**{**base.__dict__, "between": ((WritePhys(pte, (0x64_1027).to_bytes(8, "little")),),)})
    regs = run_model(prog).regs
    assert (regs["rbx"], regs["rcx"], regs["r8"]) == (0x0A0A0A0A0A0A0A0A,) * 3


def test_iretq_is_an_emulation_failure_that_does_not_end_the_batch() -> None:
    """Measured (docs/real-kvm.md, iretq_same_ring_cpl0): IRETQ at CPL0 counts insn_emulation and
    insn_emulation_fail; kvm_pvm finishes it inside the entry, so with the hlt the run is one exit."""
    prog = Program("p", "push 0x10\npush 0x8000\npushfq\npush 0x08\nlea rax, [rel back]\npush rax\niretq\n"
                        "back: hlt")
    obs = run_model(prog)
    assert (obs.counters["exits"], obs.extra["insn_emulation_fail"], obs.counters["insn_emulation"]) == (1, 1, 8)


def test_rmw_fault_reports_a_write() -> None:
    """SDM: the read of ADD [m], r translates for writing: a read-only page faults with W=1 (0x7 at
    CPL3)."""
    prog = Program("p", "mov qword [RT_FIXUP], done\nadd qword [0x610000], 1\ndone: hlt", cpl=3,
                   maps=(Map(0x61_0000, 0x1000, flags="u"),), faults={"pf": "resume"})
    [fault] = run_model(prog).faults
    assert (fault.vector, fault.error_code, fault.cr2) == (14, 0x7, 0x61_0000)


@pytest.mark.parametrize("profile", ["vmx-ept", "vmx-shadow"])
def test_vmx_profiles_run_every_ring_natively(profile: str) -> None:
    """A plain VMX host: no emulation batches; MMIO at CPL0 is a fault (EPT misconfig or #PF)."""
    prog = Program("p", f"mov rdi, {MMIO:#x}\nmov dword [rdi], 1\nhlt", maps=MAPS)
    c = run_model(prog, profile).counters
    assert c["mmio_exits"] == 1 and c["insn_emulation"] == 1
