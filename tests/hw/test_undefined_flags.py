"""SDM-undefined flags are never compared: the software CPU tracks them, the runner masks them.

Expected masks come from the SDM's "Flags Affected" sections (Vol. 2): MUL/IMUL leave SF, ZF, AF, PF
undefined; DIV/IDIV all six; SHL/SAR AF (and OF for a count other than 1); ROL OF for a count other
than 1; BT/BTS OF, SF, AF, PF; AND/OR/XOR/TEST AF; MOV to a control register all six.  The
regression case is the failure an Intel family 6 model 207 host showed on ``alu_flags``: ``gpa
0x600000: model 0x202 real 0x206`` (PF computed after MUL, where this AMD host leaves it).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from kvmmu.hw.x86cpu import AF, CF, OF, PF, SF, ZF
from kvmmu.realdiff import compare, load_programs, run_model

from .test_x86cpu import run

ARITH = CF | PF | AF | ZF | SF | OF
CORPUS = Path(__file__).parents[1] / "realdiff" / "corpus"


@pytest.mark.parametrize(("code", "undefined"), [
    ("mov eax, 3\nmov ecx, 5\nmul ecx", SF | ZF | AF | PF),
    ("mov rax, -3\nmov rcx, 5\nimul rcx", SF | ZF | AF | PF),
    ("mov eax, 9\nimul eax, eax, 3", SF | ZF | AF | PF),
    ("mov eax, 100\nxor edx, edx\nmov ecx, 7\ndiv ecx", ARITH),
    ("mov rax, -100\ncqo\nmov rcx, 7\nidiv rcx", ARITH),
    ("mov eax, 0x81\nshl eax, 3", AF | OF),
    ("mov eax, 0x81\nshl eax, 1", AF),
    ("mov eax, -3\nsar eax, 1", AF),
    ("mov eax, 0x80000001\nrol eax, 4", OF),
    ("mov eax, 0x80000001\nrol eax, 1", 0),
    ("xor eax, eax\nmov eax, 5\nbt eax, 2", OF | SF | AF | PF),
    ("mov eax, 5\nand eax, 3", AF),
    ("mov eax, 5\ntest eax, eax", AF),
    ("mov eax, 5\nadd eax, 3", 0),
    ("mov eax, 5\nmul eax\nadd eax, 1", 0),            # ADD defines all six again
    ("mov eax, 5\nmul eax\nstc", SF | ZF | AF | PF),  # STC defines CF only
    ("mov eax, 5\nmul eax\nmov ecx, 0\nshl eax, cl", SF | ZF | AF | PF),  # count 0: flags untouched
    ("mov rax, cr0\nmov cr0, rax", ARITH),
])
def test_undefined_rflags_bits_follow_the_sdm(code: str, undefined: int) -> None:
    cpu, _ = run(code + "\nhlt")
    assert cpu.undefined.undef == undefined
    assert cpu.undefined.uses == []


def test_stored_flags_images_keep_their_undefined_bits() -> None:
    """PUSHFQ stores the image; POP and MOV carry it to a register and to memory; a later PUSHFQ of
    defined flags over it clears the mark; POPFQ brings the bits back into RFLAGS."""
    cpu, _ = run("mov eax, 3\nmov ecx, 5\nmul ecx\npushfq\npop r14\nmov [0x6000], r14\n"
                 "mov [0x6008], r14d\nadd eax, 1\npushfq\npop r13\npush r14\npopfq\nhlt")
    t = cpu.undefined
    low = SF | ZF | AF | PF
    assert t.regs == {14: low}                         # r13 holds the defined image of ADD
    assert t.mem.get(0x6000) == low and t.mem.get(0x6008) == low and 0x6001 not in t.mem
    assert t.undef == low                             # POPFQ of r14's image
    assert t.uses == []


def test_consuming_an_undefined_flag_is_reported() -> None:
    """A Jcc on ZF after MUL, or arithmetic on a flags image, depends on the CPU model."""
    cpu, _ = run("mov eax, 3\nmov ecx, 5\nmul ecx\njz l\nl: pushfq\npop rax\nadd rax, 1\nhlt")
    assert len(cpu.undefined.uses) == 2
    assert "reads undefined RFLAGS bits 0x40" in cpu.undefined.uses[0]
    assert "rax" in cpu.undefined.uses[1]
    cpu, _ = run("mov eax, 3\nmov ecx, 5\nmul ecx\njc l\nl: pushfq\npop rax\nor rax, 0xd4\nhlt")
    assert cpu.undefined.uses == [] and cpu.undefined.regs == {}   # OR with 1s defines the bits


def test_exception_frame_rflags_slot_is_marked() -> None:
    """A #DE after MUL: the frame's RFLAGS qword carries MUL's undefined bits (MOV defines none)."""
    cpu, bus = run("mov eax, 3\nmov ecx, 5\nmul ecx\nmov ecx, 0\ndiv ecx\nhlt",
                   handler="pushfq\npop rbx\nhlt")
    frame_rflags = cpu.regs[4] + 16                   # rip, cs, rflags, rsp, ss (no error code)
    assert cpu.undefined.mem.get(frame_rflags) == (SF | ZF | AF | PF) & 0xFF


def _alu_flags(cpl: int) -> tuple[object, object]:
    [program] = [p for p in load_programs([CORPUS / "more.py"]) if p.name == f"alu_flags_cpl{cpl}"]
    return program, run_model(program)


def _with_qword(memory: dict[int, bytes], gpa: int, xor: int) -> dict[int, bytes]:
    page = bytearray(memory[gpa & ~0xFFF])
    off = gpa & 0xFFF
    value = int.from_bytes(page[off:off + 8], "little") ^ xor
    page[off:off + 8] = value.to_bytes(8, "little")
    return {**memory, gpa & ~0xFFF: bytes(page)}


@pytest.mark.parametrize("cpl", [0, 3])
def test_a_host_with_other_undefined_flags_still_agrees(cpl: int) -> None:
    """Simulate the Intel host: the same run with PF set in the MUL image at 0x600000 (0x206 where
    the model stored 0x202) and every other undefined bit of every image flipped — the comparison
    stays clean; a *defined* flag difference (CF of ADC/SBB's image at 0x6000b0) is still reported."""
    program, model = _alu_flags(cpl)
    assert int.from_bytes(model.memory[0x600000][0:8], "little") & PF == 0
    intel = _with_qword(model.memory, 0x600000, PF)
    for gpa, bits in model.undefined.items():
        if gpa != 0x600000:
            page = bytearray(intel[gpa & ~0xFFF])
            page[gpa & 0xFFF] ^= bits
            intel = {**intel, gpa & ~0xFFF: bytes(page)}
    real = replace(model, backend="real", memory=intel)
    assert all(d.equal for d in compare(program, model, real))     # type: ignore[arg-type]

    wrong = replace(real, memory=_with_qword(intel, 0x6000B0, CF))
    [memory] = [d for d in compare(program, model, wrong) if d.name == "memory"]   # type: ignore[arg-type]
    assert not memory.equal and "gpa 0x6000b0" in memory.lines[0]


def test_undefined_rflags_in_the_final_registers_are_not_compared() -> None:
    program, model = _alu_flags(0)
    model = replace(model, undefined_regs={"rflags": SF | ZF | AF | PF})
    real = replace(model, backend="real", regs={**model.regs, "rflags": model.regs["rflags"] ^ PF})
    assert all(d.equal for d in compare(program, model, real))     # type: ignore[arg-type]
    real = replace(real, regs={**real.regs, "rflags": real.regs["rflags"] ^ CF})
    assert [d.name for d in compare(program, model, real) if not d.equal] == ["regs"]  # type: ignore[arg-type]


def test_no_corpus_program_consumes_an_undefined_value() -> None:
    """A corpus program whose result depends on an SDM-undefined value would agree only on some
    hosts; none may (checked on the model, so on every host)."""
    for program in load_programs([CORPUS]):
        assert run_model(program).undefined_uses == [], program.name
