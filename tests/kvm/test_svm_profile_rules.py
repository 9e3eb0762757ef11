"""Rules of KVM 6.1 on SVM that the lab profiles carry (kvmmu.kvm.profiles_svm; docs/real-kvm.md,
"the nested lab"): expected values from KVM's code, checked against the model under svm-shadow."""

from __future__ import annotations

import dataclasses

import iced_x86 as ix
import pytest

from kvmmu.guest.runtime import Map, Program, Slot
from kvmmu.kvm.emulate_retry import page_table_writing_insn
from kvmmu.kvm.profiles import PROFILES
from kvmmu.realdiff import run_model

RO = 0x80_0000


def _decode(code: bytes) -> ix.Instruction:
    return ix.Decoder(64, code).decode()


@pytest.mark.parametrize(("code", "flagged"), [
    (b"\x48\x89\x07", True),            # mov [rdi], rax          88/89: PageTable
    (b"\x48\xc7\x07\x01\x00\x00\x00", True),   # mov qword [rdi], 1  group11
    (b"\x48\x09\x07", True),            # or [rdi], rax
    (b"\x48\x0f\xab\x07", True),        # bts [rdi], rax
    (b"\xf0\x48\x0f\xb1\x0f", True),    # lock cmpxchg [rdi], rcx
    (b"\x48\x8b\x07", False),           # mov rax, [rdi]          8B: no PageTable
    (b"\x48\x01\x07", False),           # add [rdi], rax
    (b"\x48\x83\x07\x07", False),       # add qword [rdi], 7      group1 /0
    (b"\xf3\x0f\x7f\x07", False),       # movdqu [rdi], xmm0      0F 7F
    (b"\xf3\x48\xa5", False),           # rep movsq
    (b"\x48\x0f\xc3\x07", False),       # movnti [rdi], rax       0F C3
])
def test_page_table_writing_insn_is_kvms_pagetable_flag(code: bytes, flagged: bool) -> None:
    assert page_table_writing_insn(_decode(code)) is flagged


def _ro_write(insn: str) -> Program:
    return Program(name="ro_write", slots=(Slot(0, 0, 8 << 20), Slot(1, RO, 0x1000, flags=2)),
                   maps=(Map(RO, 0x1000, flags="rw"),), data={RO: bytes(64)},
                   code=f"mov rsi, {RO:#x}\nmov rax, [rsi]\n{insn}\nhlt")


@pytest.mark.parametrize(("insn", "faults"), [("add qword [rsi + 8], 7", 2), ("mov qword [rsi + 8], 7", 1)])
def test_readonly_slot_write_is_retried_once_unless_page_table_writing(insn: str, faults: int) -> None:
    """retry_instruction (6.1): the first RET_PF_EMULATE fault of a non-PageTable instruction is
    retried (its decode counts in insn_emulation), the second on the same RIP and address emulated."""
    c = run_model(_ro_write(insn), "svm-shadow").counters
    # svm-shadow on a KVM that emulates at once (as from Linux 6.12)
    base = run_model(_ro_write(insn), dataclasses.replace(PROFILES["svm-shadow"], retry_pf_emulation=False)).counters
    assert c["pf_emulate"] == faults and base["pf_emulate"] == 1
    assert c["insn_emulation"] - base["insn_emulation"] == faults - 1
    assert c["exits"] - base["exits"] == faults - 1
    assert c["mmio_exits"] == base["mmio_exits"] == 1


@pytest.mark.parametrize(("cr", "shadow_exits"), [(0, 0), (3, 1), (4, 1)])
def test_cr_reads_intercepted_as_init_vmcb_sets_them(cr: int, shadow_exits: int) -> None:
    """init_vmcb intercepts CR0/CR3/CR4 reads; npt clears the CR3 one, update_cr0_intercept the CR0
    one while the guest's CR0 (PG and WP set) is the CPU's.  No decode assists: each is emulated."""
    prog = Program(name="cr_read", code=f"mov rax, cr{cr}\nhlt")
    for profile, exits in (("svm-shadow", shadow_exits), ("svm-npt-legacy", 1 if cr == 4 else 0)):
        c = run_model(prog, profile).counters
        plain = run_model(Program(name="cr_read", code="nop\nhlt"), profile).counters
        assert c["exits"] - plain["exits"] == exits, profile
        assert c["insn_emulation"] - plain["insn_emulation"] == exits, profile


def test_cr0_read_intercepted_while_wp_is_clear_under_shadow_paging() -> None:
    prog = Program(name="cr0_read_nowp", cr0_wp=False, code="mov rax, cr0\nhlt")
    plain = Program(name="cr0_read_nowp", cr0_wp=False, code="nop\nhlt")
    assert run_model(prog, "svm-shadow").counters["exits"] - run_model(plain, "svm-shadow").counters["exits"] == 1
