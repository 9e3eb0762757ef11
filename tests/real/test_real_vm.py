"""kvmmu.real against the real /dev/kvm, checked against docs/spec/kvm-pvm-host.md.

Guests are hand-assembled x86-64 machine code, one instruction per line.  They start in flat long
mode at CPL0 (run by KVM's instruction emulator on kvm_pvm) unless a test says CPL3 (native).
"""

from __future__ import annotations

import os

import pytest

from kvmmu.errors import KvmmuError, MemslotError
from kvmmu.real import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KvmIoctlError,
    RealVM,
    available,
    stats_delta,
    unavailable_reason,
)
from kvmmu.real import ioctls as K
from kvmmu.real.cpuid import find
from kvmmu.real.hostinfo import kvm_pvm_mismatch

pytestmark = [
    pytest.mark.realkvm,
    pytest.mark.skipif(not available(), reason=f"needs a usable /dev/kvm: {unavailable_reason()}"),
]
kvm_pvm_only = pytest.mark.skipif(kvm_pvm_mismatch() is not None, reason=str(kvm_pvm_mismatch()))


def imm64(v: int) -> bytes:
    return v.to_bytes(8, "little")


def imm32(v: int) -> bytes:
    return v.to_bytes(4, "little")


HLT = b"\xf4"


def test_mmio_write_to_unbacked_gpa_is_one_exit_then_hlt(guest) -> None:
    """Any GPA not covered by a memslot gives KVM_EXIT_MMIO; a 4-byte access is one exit of that
    length with little-endian data."""
    vm, vcpu = guest(
        b"\x48\xbf" + imm64(guest.MMIO)       # mov rdi, MMIO
        + b"\xc7\x07" + imm32(0xDEADBEEF)     # mov dword [rdi], 0xdeadbeef
        + HLT)                                # hlt
    ex = vcpu.run()
    assert (ex.reason, ex.phys_addr, ex.len, ex.is_write) == ("mmio", guest.MMIO, 4, True)
    assert ex.data == bytes.fromhex("efbeadde") and ex.value == 0xDEADBEEF
    assert vcpu.run().reason == "hlt"
    assert [(a.phys_addr, a.len, a.data, a.direction) for a in vcpu.mmio_log] == [
        (guest.MMIO, 4, bytes.fromhex("efbeadde"), "write")]


def test_mmio_read_value_from_handler_reaches_register_and_ram(guest) -> None:
    """For reads, the value written into kvm_run.mmio.data before the next KVM_RUN is what the
    guest loads."""
    vm, vcpu = guest(
        b"\x48\xbf" + imm64(guest.MMIO + 8)   # mov rdi, MMIO+8
        + b"\x48\x8b\x07"                     # mov rax, [rdi]
        + b"\x48\xbe" + imm64(guest.DATA)     # mov rsi, DATA
        + b"\x48\x89\x06"                     # mov [rsi], rax
        + HLT)                                # hlt
    asked = []

    def device(access) -> int:
        asked.append((access.phys_addr, access.len, access.value))
        return 0x0123_4567_89AB_CDEF

    assert vcpu.run(mmio_handler=device).reason == "hlt"
    assert asked == [(guest.MMIO + 8, 8, None)]
    assert vcpu.get_regs()["rax"] == 0x0123_4567_89AB_CDEF
    assert vm.read_phys(guest.DATA, 8) == (0x0123_4567_89AB_CDEF).to_bytes(8, "little")
    [read] = vcpu.mmio_log
    assert (read.direction, read.value) == ("read", 0x0123_4567_89AB_CDEF)


def test_mmio_read_answered_between_runs(guest) -> None:
    """Without a handler, run() stops at the read; complete_mmio_read supplies the data."""
    vm, vcpu = guest(
        b"\x48\xbf" + imm64(guest.MMIO)       # mov rdi, MMIO
        + b"\x8a\x07"                         # mov al, [rdi]
        + HLT)                                # hlt
    ex = vcpu.run()
    assert (ex.reason, ex.is_write, ex.len) == ("mmio", False, 1)
    vcpu.complete_mmio_read(0x5A)
    assert vcpu.run().reason == "hlt"
    assert vcpu.get_regs()["rax"] & 0xFF == 0x5A


def test_readonly_memslot_reads_memory_and_writes_exit_as_mmio(guest) -> None:
    """KVM_MEM_READONLY slot: reads come from memory, writes exit as MMIO with is_write=1 and the
    memory stays unchanged."""
    rom = 0x400000
    vm, vcpu = guest(
        b"\x48\xbf" + imm64(rom)              # mov rdi, ROM
        + b"\x48\x8b\x07"                     # mov rax, [rdi]
        + b"\x48\xbe" + imm64(guest.DATA)     # mov rsi, DATA
        + b"\x48\x89\x06"                     # mov [rsi], rax
        + b"\xc7\x07" + imm32(0x55555555)     # mov dword [rdi], 0x55555555
        + HLT,                                # hlt
        slots=((1, rom, 0x1000, KVM_MEM_READONLY),))
    vm.write_phys(rom, bytes(range(1, 9)))
    writes = []
    assert vcpu.run(mmio_handler=lambda a: writes.append((a.phys_addr, a.len, a.value))).reason == "hlt"
    assert writes == [(rom, 4, 0x55555555)]
    assert vm.read_phys(guest.DATA, 8) == bytes(range(1, 9))
    assert vm.read_phys(rom, 8) == bytes(range(1, 9))


def test_moved_memslot_keeps_its_memory_and_old_gpa_becomes_mmio(guest) -> None:
    """Moving a slot (same id, same hva, new GPA) works; the old GPA then exits as MMIO."""
    old, new = 0x400000, 0x800000
    vm, vcpu = guest(
        b"\x48\xbf" + imm64(new)              # mov rdi, NEW
        + b"\x48\x8b\x07"                     # mov rax, [rdi]
        + b"\x48\xbf" + imm64(old)            # mov rdi, OLD
        + b"\x48\x8b\x1f"                     # mov rbx, [rdi]
        + HLT,                                # hlt
        slots=((1, old, 0x1000),))
    vm.write_phys(old, imm64(0xC0FFEE))
    vm.set_user_memory_region(1, new, 0x1000)
    assert vm.read_phys(new, 8) == imm64(0xC0FFEE)
    ex = vcpu.run()
    assert (ex.reason, ex.phys_addr, ex.is_write) == ("mmio", old, False)
    assert vcpu.get_regs()["rax"] == 0xC0FFEE


def test_overlapping_memslot_is_refused_and_vm_unchanged(guest) -> None:
    """Overlapping slots are refused by KVM_SET_USER_MEMORY_REGION; the error names the GPA."""
    vm, _ = guest(HLT)
    before = vm.memslots
    with pytest.raises(MemslotError) as info:
        vm.set_user_memory_region(1, 0x100000, 0x1000)
    assert info.value.what == "guest_phys_addr" and info.value.value == 0x100000
    assert "0x100000" in str(info.value) and "slot 0" in str(info.value)
    assert info.value.errno_name == "EEXIST"   # upstream KVM's errno for an overlap
    assert vm.memslots == before


def test_slot_id_limit_is_kvm_cap_nr_memslots() -> None:
    """KVM_CAP_NR_MEMSLOTS = 32764: id 32763 can be created, id 32764 gives EINVAL."""
    with RealVM() as vm:
        nr = vm.check_extension(K.KVM_CAP_NR_MEMSLOTS)
        assert nr == 32764
        vm.set_user_memory_region(nr - 1, 0x1000_0000, 0x1000)
        with pytest.raises(MemslotError) as info:
            vm.set_user_memory_region(nr, 0x2000_0000, 0x1000)
        assert (info.value.what, info.value.value, info.value.errno_name) == ("slot", nr, "EINVAL")
        assert list(vm.memslots) == [nr - 1]


@pytest.mark.parametrize(("args", "what"), [
    ((1, 0x400001, 0x1000), "guest_phys_addr"),    # GPA not page aligned
    ((1, 0x400000, 0x800), "memory_size"),         # size not a page multiple
    ((0, 0, 4 << 20), "memory_size"),              # resizing a live slot
    ((1, 0x400000, 0x1000, 4), "flags"),           # unknown flag
    ((5, 0, 0), "slot"),                           # deleting a slot that does not exist
])
def test_invalid_memslot_changes_raise_einval(guest, args: tuple[int, ...], what: str) -> None:
    """KVM refuses misaligned, resized, unknown-flag and phantom-delete requests with EINVAL."""
    vm, _ = guest(HLT)
    with pytest.raises(MemslotError) as info:
        vm.set_user_memory_region(*args)
    assert (info.value.what, info.value.errno_name) == (what, "EINVAL")


def test_dirty_log_reports_the_written_page(guest) -> None:
    """LOG_DIRTY_PAGES can be turned on for a live slot; KVM_GET_DIRTY_LOG then reports the
    written page, and a second call reports nothing (the log is cleared)."""
    base = 0x600000
    vm, vcpu = guest(
        b"\x48\xbf" + imm64(base + 2 * 0x1000 + 8)  # mov rdi, BASE + page 2 + 8
        + b"\xc7\x07" + imm32(0x1234)               # mov dword [rdi], 0x1234
        + HLT,                                      # hlt
        slots=((2, base, 4 * 0x1000),))
    with pytest.raises(MemslotError):
        vm.get_dirty_log(2)                          # not logging yet: ENOENT
    vm.set_user_memory_region(2, base, 4 * 0x1000, KVM_MEM_LOG_DIRTY_PAGES)
    assert vm.get_dirty_log(2) == set()
    assert vcpu.run().reason == "hlt"
    assert vm.get_dirty_log(2) == {2}
    assert vm.get_dirty_log(2) == set()


def test_stats_count_mmio_exits_and_emulated_instructions(guest) -> None:
    """1 MMIO exit per emulated MMIO write: mmio_exits += N, exits += N + 1 (the HLT),
    halt_exits += 1; at CPL0 insn_emulation counts every instruction executed."""
    n = 3
    vm, vcpu = guest(
        b"\x48\xbf" + imm64(guest.MMIO)       # mov rdi, MMIO
        + b"\xb9" + imm32(n)                  # mov ecx, N
        + b"\x89\x0f"                         # loop: mov [rdi], ecx
        + b"\xff\xc9"                         #       dec ecx
        + b"\x75\xfa"                         #       jnz loop
        + HLT)                                # hlt
    before = vcpu.stats
    seen = []
    assert vcpu.run(mmio_handler=lambda a: seen.append(a.value)).reason == "hlt"
    delta = stats_delta(before, vcpu.stats)
    assert seen == [3, 2, 1]
    assert delta["mmio_exits"] == n == len(vcpu.mmio_log)
    assert delta["exits"] == n + 1 and delta["halt_exits"] == 1
    if os.path.exists("/sys/module/kvm_pvm"):
        assert delta["insn_emulation"] == 2 + 3 * n + 1


def test_vm_stats_are_readable_with_kvm_names(guest) -> None:
    """VM stats include pages_4k and mmu_shadow_zapped; deleting a used slot zaps a shadow page."""
    vm, vcpu = guest(HLT)
    stats = vm.stats
    assert {"pages_4k", "pages_2m", "mmu_shadow_zapped", "mmu_pte_write", "remote_tlb_flush"} <= set(stats)
    assert all(isinstance(v, int) for v in stats.values())
    assert {"pf_taken", "pf_fixed", "pf_emulate", "pf_mmio_spte_created", "mmio_exits", "exits",
            "insn_emulation", "halt_wait_hist"} <= set(vcpu.stats)
    assert isinstance(vcpu.stats["halt_wait_hist"], tuple)
    assert vcpu.run().reason == "hlt"
    before = vm.stats
    vm.set_user_memory_region(0, 0, 0)
    assert stats_delta(before, vm.stats)["mmu_shadow_zapped"] >= 1


@kvm_pvm_only
def test_cpl3_mmio_writes_go_through_the_shadow_mmu_page_fault_path(guest) -> None:
    """At CPL3 (native) each MMIO write is a shadow page fault that is emulated: pf_emulate and
    mmio_exits += N, and with mmio_caching=N no MMIO spte is ever created.  The final HLT #GPs
    into the CPL0 handler (IDT delivery with the stack switched to TSS.RSP0)."""
    n = 5
    vm, vcpu = guest(
        b"\x48\xbf" + imm64(guest.MMIO)       # mov rdi, MMIO
        + b"\xb9" + imm32(n)                  # mov ecx, N
        + b"\x89\x0f"                         # loop: mov [rdi], ecx
        + b"\xff\xc9"                         #       dec ecx
        + b"\x75\xfa"                         #       jnz loop
        + HLT,                                # hlt (privileged: #GP at CPL3)
        cpl=3,
        handler=HLT)                          # CPL0 handler for every vector: hlt
    assert vcpu.get_sregs().cpl == 3
    before = vcpu.stats
    assert vcpu.run(mmio_handler=lambda a: None).reason == "hlt"
    delta = stats_delta(before, vcpu.stats)
    assert delta["mmio_exits"] == n and delta["pf_emulate"] == n
    assert delta["pf_taken"] >= n and delta["pf_mmio_spte_created"] == 0
    regs = vcpu.get_regs()
    assert regs["rip"] == guest.HANDLER + 1
    # the #GP frame on the RSP0 stack: error code, RIP, CS, RFLAGS, RSP, SS
    frame = vm.read_phys(regs["rsp"], 48)
    err, rip, cs = (int.from_bytes(frame[i:i + 8], "little") for i in (0, 8, 16))
    assert (err, rip, cs) == (0, guest.CODE + 0x15, 0x23)


def test_shutdown_keeps_the_first_exception_in_vcpu_events(guest) -> None:
    """After a triple fault (no IDT): KVM_EXIT_SHUTDOWN, CR2 = faulting address, RIP = faulting
    instruction, and KVM_GET_VCPU_EVENTS shows the first exception (nr=14, err=2 for a write)."""
    unmapped = 0x2_0000_0000                  # above the 4 GiB identity map: not present
    vm, vcpu = guest(
        b"\x48\xbf" + imm64(unmapped)         # mov rdi, UNMAPPED
        + b"\xc7\x07" + imm32(1)              # mov dword [rdi], 1   <- #PF
        + HLT)                                # hlt
    assert vcpu.run().reason == "shutdown"
    assert vcpu.get_sregs().cr2 == unmapped
    assert vcpu.get_regs()["rip"] == guest.CODE + 10
    ev = vcpu.get_vcpu_events()
    if os.path.exists("/sys/module/kvm_pvm"):   # observed kvm_pvm behaviour, not an ABI
        assert (ev.exception_nr, ev.exception_has_error_code, ev.exception_error_code) == (14, 1, 2)
        assert (ev.exception_injected, ev.exception_pending) == (0, 0)


def test_translate_walks_the_guest_tables(guest) -> None:
    """KVM_TRANSLATE maps an identity-mapped GVA to itself and reports an unmapped one invalid."""
    vm, vcpu = guest(HLT)
    t = vcpu.translate(guest.DATA + 0x123)
    assert (t.valid, t.physical_address) == (True, guest.DATA + 0x123)
    assert not vcpu.translate(0x2_0000_0000).valid


@kvm_pvm_only
def test_int3_at_cpl0_is_an_emulation_failure_with_instruction_bytes(guest) -> None:
    """int3 at CPL0 is KVM_EXIT_INTERNAL_ERROR suberror 1 (EMULATION) with the bytes at RIP."""
    vm, vcpu = guest(
        b"\x90"                               # nop
        + b"\xcc"                             # int3
        + HLT)                                # hlt
    ex = vcpu.run()
    assert (ex.reason, ex.suberror, ex.suberror_name) == ("internal_error", 1, "emulation")
    assert ex.insn_bytes is not None and ex.insn_bytes[:2] == b"\xcc\xf4"
    assert vcpu.stats["insn_emulation_fail"] == 1


@kvm_pvm_only
def test_singlestep_gives_a_debug_exit_per_instruction(guest) -> None:
    """KVM_SET_GUEST_DEBUG ENABLE|SINGLESTEP: KVM_EXIT_DEBUG after each CPL0 instruction,
    exception 1, pc = next RIP, dr6 = 0xffff4ff0."""
    vm, vcpu = guest(b"\x90" + b"\x90" + HLT)  # nop; nop; hlt
    vcpu.set_guest_debug(singlestep=True)
    exits = [vcpu.run() for _ in range(2)]
    assert [(e.reason, e.exception, e.pc, e.dr6) for e in exits] == [
        ("debug", 1, guest.CODE + 1, 0xFFFF4FF0), ("debug", 1, guest.CODE + 2, 0xFFFF4FF0)]


def test_port_io_exits_and_in_data(guest) -> None:
    """OUT and IN exit as KVM_EXIT_IO; the IN value placed at data_offset lands in AL."""
    vm, vcpu = guest(
        b"\xb0\x42"                           # mov al, 0x42
        + b"\xe6\x80"                         # out 0x80, al
        + b"\xe4\x81"                         # in al, 0x81
        + HLT)                                # hlt
    calls = []

    def ports(port: int, size: int, value: int | None = None) -> int:
        calls.append((port, size, value))
        return 0x99

    assert vcpu.run(io_handler=ports).reason == "hlt"
    assert calls == [(0x80, 1, 0x42), (0x81, 1, None)]
    assert vcpu.get_regs()["rax"] & 0xFF == 0x99


def test_max_exits_guard_stops_a_runaway_guest(guest) -> None:
    """A guest that never halts is stopped after max_exits handled exits with a KvmmuError."""
    vm, vcpu = guest(
        b"\x48\xbf" + imm64(guest.MMIO)       # mov rdi, MMIO
        + b"\x89\x07"                         # loop: mov [rdi], eax
        + b"\xeb\xfc")                        #       jmp loop
    answered = []
    with pytest.raises(KvmmuError, match="max_exits=10"):
        vcpu.run(mmio_handler=lambda a: answered.append(a), max_exits=10)
    assert len(answered) == 10 and len(vcpu.mmio_log) == 11   # the 11th exit is left unanswered


def test_timeout_interrupts_a_guest_that_never_exits(guest) -> None:
    """A signal gets control back from a KVM_RUN that would never return (an `intr` exit)."""
    vm, vcpu = guest(b"\xeb\xfe")             # jmp $
    assert vcpu.run(timeout=0.05).reason == "intr"
    assert vcpu.get_regs()["rip"] == guest.CODE


def test_set_sregs_rejects_la57_naming_the_registers(guest) -> None:
    """KVM_SET_SREGS refuses CR4.LA57 with EINVAL when the guest CPUID has no LA57 (leaf 7 ECX[16];
    kvm_is_valid_cr4 reserves CR4 bits the guest CPUID lacks); the error shows cr4."""
    vm, vcpu = guest(HLT)
    leaf7 = find(vm.cpuid, 7, 0)
    if leaf7 is not None and leaf7.ecx & 1 << 16:
        pytest.skip("this host's supported CPUID offers LA57")
    cr4 = vcpu.get_sregs().cr4 | 1 << 12
    with pytest.raises(KvmIoctlError) as info:
        vcpu.set_sregs(cr4=cr4)
    assert info.value.errno_name == "EINVAL" and f"cr4={cr4:#x}" in str(info.value)


def test_set_sregs_changes_only_the_named_fields(guest) -> None:
    """set_sregs(**changes) is read-modify-write; a segment can be changed by a dict of fields."""
    vm, vcpu = guest(HLT)
    before = vcpu.get_sregs()
    vcpu.set_sregs(fs={"base": 0x1234_5000}, cr4=before.cr4 | 1 << 7)   # CR4.PGE
    after = vcpu.get_sregs()
    assert after.fs.base == 0x1234_5000 and after.fs.selector == before.fs.selector
    assert after.cr4 == before.cr4 | 1 << 7 and after.cs == before.cs and after.cr3 == before.cr3
    vcpu.set_sregs(cpl=3, rflags=0x202)
    user = vcpu.get_sregs()
    assert (user.cpl, user.cs.selector, user.ss.selector, user.cs.l) == (3, 0x23, 0x2B, 1)
    assert vcpu.get_regs()["rflags"] == 0x202


def test_closing_vms_returns_every_fd() -> None:
    """RealVM as a context manager closes its /dev/kvm, VM, vCPU and stats fds."""
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with RealVM() as vm:
            vm.set_user_memory_region(0, 0, 1 << 20)
            vcpu = vm.create_vcpu()
            vcpu.stats  # noqa: B018 - opens the vCPU stats fd
            vm.stats  # noqa: B018 - opens the VM stats fd
    assert len(os.listdir("/proc/self/fd")) == fds
    assert vm.closed
