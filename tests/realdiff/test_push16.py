"""Operand size of PUSH/POP with a 66 prefix, and the assembler's NASM defaults.

SDM Vol. 2B PUSH / POP: in 64-bit mode the operand size is 64 bits, or 16 bits with a 66 prefix
(32 bits cannot be encoded); the stack pointer moves by the operand size, a 16-bit POP into a
register writes only its low 16 bits.  NASM (64-bit mode): ``push imm`` without a size is a qword
push (68 id / 6A ib), ``push word imm`` is 66 68 iw / 66 6A ib, an unsized ``call [mem]`` / ``jmp
[mem]`` is a near indirect branch through a qword (FF /2, FF /4); ``pushf`` / ``popf`` are the
64-bit forms, ``pushfw`` / ``popfw`` the 16-bit ones (66 9C / 66 9D).  The same program is measured on
the real /dev/kvm (corpus ``push16.py``, both rings).
"""

from __future__ import annotations

import pytest

from kvmmu.tools.asm import assemble

from ..hw.test_x86cpu import CODE, STACK, run


@pytest.mark.parametrize(("src", "encoding"), [
    ("push 0x1234", "6834120000"),
    ("push 200", "68c8000000"),
    ("push 7", "6a07"),
    ("push word 0x1234", "66683412"),
    ("push word 5", "666a05"),
    ("push qword 5", "6a05"),
    ("push ax", "6650"),
    ("pop ax", "6658"),
    ("push word [rax]", "66ff30"),
    ("pop word [rax]", "668f00"),
    ("call [rax]", "ff10"),
    ("jmp [rax]", "ff20"),
    ("call qword [rbx + 8]", "ff5308"),
    ("cbw", "6698"),                       # only a 16-bit form exists: still chosen
    ("pushf", "9c"),
    ("popf", "9d"),
    ("pushfw", "669c"),
    ("popfw", "669d"),
])
def test_assembler_encodings_follow_nasm(src: str, encoding: str) -> None:
    assert assemble(src).code.hex() == encoding


@pytest.mark.parametrize(("push", "moved", "stored"), [
    ("push word 0x1234", 2, b"\x34\x12"),
    ("push word -2", 2, b"\xfe\xff"),
    ("mov eax, 0xabcd\npush ax", 2, b"\xcd\xab"),
    ("push 0x1234", 8, (0x1234).to_bytes(8, "little")),
    ("push -2", 8, b"\xfe" + b"\xff" * 7),
])
def test_push_moves_rsp_by_the_operand_size(push: str, moved: int, stored: bytes) -> None:
    cpu, bus = run(f"{push}\nhlt")
    assert cpu.regs[4] == STACK - moved
    assert bytes(bus.mem[STACK - moved:STACK]) == stored


def test_push_m16_and_pop_m16_move_two_bytes() -> None:
    cpu, bus = run("mov dword [0x6000], 0xdeadbeef\nmov qword [0x6008], 0\npush word [0x6000]\n"
                   "pop word [0x6008]\nhlt")
    assert cpu.regs[4] == STACK
    assert bytes(bus.mem[0x6008:0x6010]) == b"\xef\xbe" + bytes(6)


def test_pop_r16_writes_only_the_low_16_bits() -> None:
    cpu, _ = run("mov rax, -1\npush word 0x1234\npop ax\nmov rbx, 0x1111222233334444\npush rbx\n"
                 "pop bx\npop bx\npop bx\npop bx\nhlt")
    assert cpu.regs[0] == 0xFFFF_FFFF_FFFF_1234
    assert cpu.regs[3] == 0x1111_2222_3333_1111 and cpu.regs[4] == STACK


def test_call_and_jmp_through_unsized_memory_are_near() -> None:
    """FF /2 pushes the 8-byte return address and jumps to the qword; FF /4 jumps to the qword."""
    src = ("mov qword [0x6000], f\ncall [0x6000]\nr: hlt\nf: mov qword [0x6008], g\njmp [0x6008]\n"
           "ud2\ng: mov rbx, [rsp]\nret")
    cpu, _ = run(src)
    assert cpu.regs[3] == assemble(src, CODE)["r"] and cpu.regs[4] == STACK


def test_pushf_popf_with_66_move_flags_only() -> None:
    """PUSHF/POPF with a 66 prefix (SDM: operand size 16): FLAGS is 2 bytes on the stack; POPF
    loads bits 15:0 only (AC, bit 18, stays as it was)."""
    cpu, bus = run("stc\nmov rbx, 0x40000\npush rbx\npopfq\nstc\npushfw\n"
                   "mov word [rsp], 0x0ed7\npopfw\nhlt")
    assert cpu.regs[4] == STACK
    assert cpu.rflags == 0x40000 | 0x0ed7 | 2
    cpu, bus = run("stc\npushfw\nhlt")
    assert cpu.regs[4] == STACK - 2 and bus.mem[STACK - 2:STACK] == b"\x03\x00"
