"""The assembler layer on iced-x86: encodings, labels, data, errors.

Expected bytes are the Intel SDM encodings (the same ones tests/real writes by hand).
"""

from __future__ import annotations

import pytest

from kvmmu.tools.asm import AsmError, assemble, disassemble, evaluate


def code(src: str, base: int = 0x1000, **symbols: int) -> bytes:
    return assemble(src, base, symbols).code


def test_mov_r64_imm64_is_rex_w_b8_plus_r() -> None:
    """MOV r64, imm64 (REX.W B8+r io) when the value needs 64 bits."""
    assert code("mov rdi, 0x1122334455667788") == bytes.fromhex("48bf8877665544332211")


def test_memory_operands_use_modrm_encodings() -> None:
    """MOV r/m32, imm32 is C7 /0; MOV r64, r/m64 is REX.W 8B /r; MOV r/m64, r64 is REX.W 89 /r."""
    assert code("mov dword [rdi], 0xdeadbeef") == bytes.fromhex("c707efbeadde")
    assert code("mov rax, [rdi]") == bytes.fromhex("488b07")
    assert code("mov [rsi], rax") == bytes.fromhex("488906")
    assert code("mov qword [rsp - 8], rax") == bytes.fromhex("48894424f8")


def test_scaled_index_is_written_either_way_round() -> None:
    """MOV r32, r/m32 is 8B /r; [rbx + rcx*4] is ModRM 04 (SIB follows), SIB 8B (scale 4, index rcx,
    base rbx), whichever side of the * the register stands on."""
    assert code("mov eax, [rbx + rcx*4]") == code("mov eax, [rbx + 4*rcx]") == bytes.fromhex("8b048b")


@pytest.mark.parametrize("operand", ["[rbx - 4*rcx]", "[rbx + 4*cx]", "[rbx + 2*xmm0]"])
def test_a_scaled_index_is_an_added_64_or_32_bit_gpr(operand: str) -> None:
    """x86 addressing adds base + index*scale: a subtracted, 16-bit or non-GPR index has no encoding."""
    with pytest.raises(AsmError, match="address registers are 32/64-bit and added"):
        assemble(f"mov eax, {operand}", 0x1000)


def test_the_shortest_encoding_wins() -> None:
    """ADD r/m64, imm8 (REX.W 83 /0 ib) is chosen over the imm32 form when the value fits."""
    assert code("add rax, 1") == bytes.fromhex("4883c001")
    assert code("add rax, 0x1000") == bytes.fromhex("480500100000")


def test_backward_loop_branch_is_short() -> None:
    """LOOP rel8 back to itself is E2 FE."""
    assert code("again: loop again") == bytes.fromhex("e2fe")


def test_forward_jcc_is_relaxed_to_rel8_when_in_range() -> None:
    """Jcc rel8 (7x cb) in range, Jcc rel32 (0F 8x cd) otherwise."""
    near = assemble("jnz out\nnop\nout: hlt", 0x1000)
    assert near.code == bytes.fromhex("7501" "90" "f4")
    far = assemble("jnz out\ntimes 200 nop\nout: hlt", 0x1000)
    assert far.code[:2] == bytes.fromhex("0f85") and far.labels["out"] == 0x1000 + 6 + 200


def test_string_instructions_take_rep_prefixes() -> None:
    """REP MOVSB is F3 A4; REP STOSQ is F3 REX.W AB; LODSD is AD."""
    assert code("rep movsb\nrep stosq\nlodsd") == bytes.fromhex("f3a4" "f348ab" "ad")


def test_control_register_and_system_instructions() -> None:
    """MOV CR3, RAX is 0F 22 D8; MOV RAX, CR2 is 0F 20 D0; INVLPG [RDI] is 0F 01 3F; IRETQ is
    REX.W CF; UD2 is 0F 0B; HLT is F4."""
    assert code("mov cr3, rax\nmov rax, cr2\ninvlpg [rdi]\niretq\nud2\nhlt") == bytes.fromhex(
        "0f22d8" "0f20d0" "0f013f" "48cf" "0f0b" "f4")


def test_rip_relative_operand_addresses_the_label() -> None:
    """[rel x] is RIP-relative: the displacement counts from the next instruction."""
    out = assemble("lea rsi, [rel data]\nhlt\ndata: dq 7", 0x2000)
    assert out.code[:3] == bytes.fromhex("488d35")
    assert int.from_bytes(out.code[3:7], "little") == out.labels["data"] - (0x2000 + 7)


def test_data_directives_and_strings() -> None:
    """db/dw/dd/dq store little-endian values; db takes strings; times repeats a statement."""
    assert code('db 1, "ab"\ndw 0x1234\ndd -1\ndq 0x0102030405060708\ntimes 2 db 0xcc') == (
        b"\x01ab" + b"\x34\x12" + b"\xff" * 4 + bytes.fromhex("0807060504030201") + b"\xcc\xcc")


def test_org_starts_a_new_segment_and_align_pads() -> None:
    """org places the following bytes at an absolute address; align pads with zeros."""
    out = assemble("nop\nalign 8\nx: hlt\norg 0x5000\ny: db 9", 0x1000)
    assert out.segments == [(0x1000, b"\x90" + bytes(7) + b"\xf4"), (0x5000, b"\x09")]
    assert (out.labels["x"], out.labels["y"]) == (0x1008, 0x5000)


def test_constants_and_function_symbols_in_expressions() -> None:
    """equ constants and functions given as symbols (pte(gva)) evaluate inside operands."""
    out = assemble("BASE equ 0x600000\nmov rdi, pte(BASE) + 8", 0, {"pte": lambda gva: gva >> 9})
    assert out.code == bytes.fromhex("48c7c708300000")
    assert evaluate("(1 << 12) | 3", {}) == 0x1003


def test_disassemble_round_trips() -> None:
    assert [t for _, t in disassemble(code("mov rax, [rdi]\nhlt"), 0x1000)] == ["mov rax,[rdi]", "hlt"]


@pytest.mark.parametrize(("src", "rule"), [
    ("frobnicate rax", "unknown mnemonic 'frobnicate'"),
    ("mov rax, nowhere", "undefined symbol 'nowhere'"),
    ("x: nop\nx: nop", "label 'x' is defined twice"),
    ("mov [rdi], 1", "operand kinds/sizes match no encoding"),
    ("mov al, 0x1234", "does not fit"),
])
def test_errors_name_the_line_and_the_rule(src: str, rule: str) -> None:
    """A bad line raises AsmError (a KvmmuError) naming the line and the rule."""
    with pytest.raises(AsmError) as e:
        assemble(src, 0x1000)
    assert rule in str(e.value) and "asm line" in str(e.value)
