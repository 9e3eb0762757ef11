"""The software CPU: instruction semantics (SDM), precise faults, exception delivery, and the rule
that every memory access — fetches, stack pushes, IDT/GDT/TSS reads — goes through the bus."""

from __future__ import annotations

from struct import pack

import pytest

from kvmmu.errors import KvmmuError
from kvmmu.hw.x86cpu import (
    AF,
    CF,
    OF,
    PF,
    RF,
    SF,
    ZF,
    CpuFault,
    StepLimitExceeded,
    Stop,
    UnsupportedInstruction,
    X86Cpu,
)
from kvmmu.tools.asm import assemble

CODE, STACK, IDT, GDT, TSS, HANDLER = 0x1000, 0x8000, 0x2000, 0x3000, 0x4000, 0x5000
GDT_IMAGE = pack("<6Q", 0, 0x00209A0000000000, 0x00CF92000000FFFF, 0x00CFF2000000FFFF,
                 0x0020FA0000000000, 0x00CFF2000000FFFF)


class FlatBus:
    """Identity-mapped memory that records every access; faults on [0xF000, 0x10000)."""

    def __init__(self) -> None:
        self.mem = bytearray(0x10000)
        self.log: list[tuple[str, int, int, bool, bool]] = []

    def _check(self, gva: int, size: int, kind: str, cpl: int) -> None:
        if gva >= 0xF000 or gva + size > 0x10000:
            raise CpuFault(14, (2 if kind == "write" else 0) | (4 if cpl == 3 else 0), gva)

    def begin(self, cpu: X86Cpu) -> None: ...
    def commit(self, cpu: X86Cpu) -> None: ...
    def abort(self, cpu: X86Cpu, fault: CpuFault) -> None: ...

    def fetch(self, gva: int, n: int, cpl: int) -> bytes:
        self.log.append(("fetch", gva, n, False, False))
        return bytes(self.mem[gva:gva + n])

    def read(self, gva: int, size: int, cpl: int, implicit: bool = False, rmw: bool = False,
             restart: bool = False) -> int:
        self._check(gva, size, "read", cpl)
        self.log.append(("read", gva, size, implicit, rmw))
        return int.from_bytes(self.mem[gva:gva + size], "little")

    def write(self, gva: int, size: int, value: int, cpl: int, implicit: bool = False) -> None:
        self._check(gva, size, "write", cpl)
        self.log.append(("write", gva, size, implicit, False))
        self.mem[gva:gva + size] = value.to_bytes(size, "little")

    def rep_yield(self, cpu: X86Cpu) -> bool:
        return False

    def noncanonical_tail(self, cpu: X86Cpu) -> bool:
        return False

    def write_cr(self, cpu: X86Cpu, cr: int, value: int) -> None: ...
    def read_cr(self, cpu: X86Cpu, cr: int) -> None: ...
    def cmps_source_first(self, cpu: X86Cpu, prefix: str, size: int) -> bool:
        return False
    def invlpg(self, cpu: X86Cpu, gva: int) -> None: ...

    def halt(self, cpu: X86Cpu) -> None:
        raise Stop("hlt")

    def iret(self, cpu: X86Cpu, new_cpl: int) -> None: ...
    def soft_int(self, cpu: X86Cpu, vector: int) -> bool:
        return False

    def unemulatable(self, cpu: X86Cpu, what: str) -> None: ...
    def deliver_begin(self, cpu: X86Cpu, vector: int) -> None: ...
    def deliver_end(self, cpu: X86Cpu, vector: int) -> None: ...
    def deliver_failed(self, cpu: X86Cpu, vector: int) -> None: ...


def machine(src: str, cpl: int = 0, handler: str = "hlt") -> tuple[X86Cpu, FlatBus]:
    bus = FlatBus()
    for addr, data in assemble(src, CODE).segments:
        bus.mem[addr:addr + len(data)] = data
    for addr, data in assemble(handler, HANDLER).segments:
        bus.mem[addr:addr + len(data)] = data
    gate = pack("<HHBBHII", HANDLER & 0xFFFF, 0x08, 0, 0x8E, HANDLER >> 16, 0, 0)
    bus.mem[IDT:IDT + 16 * 32] = gate * 32
    bus.mem[GDT:GDT + len(GDT_IMAGE)] = GDT_IMAGE
    bus.mem[TSS + 4:TSS + 12] = pack("<Q", 0x7000)
    cpu = X86Cpu(bus, rip=CODE, rsp=STACK if cpl == 0 else 0x9000, rflags=2, cpl=cpl, cr0=0x80010033,
                 cr3=0, cr4=0x220, efer=0x500, gdt=(GDT, 0x2F), idt=(IDT, 16 * 32 - 1), tss=(TSS, 0x67))
    return cpu, bus


def run(src: str, **kw: object) -> tuple[X86Cpu, FlatBus]:
    cpu, bus = machine(src, **kw)  # type: ignore[arg-type]
    assert cpu.run(10_000) == "hlt"
    return cpu, bus


def test_add_sets_carry_overflow_sign_zero_parity_adjust() -> None:
    """ADD: CF on unsigned carry, OF on signed overflow, AF on a carry out of bit 3 (SDM)."""
    cpu, _ = run("mov al, 0x7f\nadd al, 1\nhlt")
    assert cpu.regs[0] & 0xFF == 0x80
    assert cpu.rflags & (CF | OF | SF | ZF | AF | PF) == OF | SF | AF
    cpu, _ = run("mov eax, 0xffffffff\nadd eax, 1\nhlt")
    assert cpu.rflags & (CF | ZF | PF) == CF | ZF | PF


def test_writes_to_32_bit_registers_zero_extend_and_8_bit_writes_merge() -> None:
    cpu, _ = run("mov rax, -1\nmov eax, 5\nmov rbx, -1\nmov bl, 7\nmov bh, 1\nhlt")
    assert cpu.regs[0] == 5 and cpu.regs[3] == 0xFFFF_FFFF_FFFF_0107


def test_inc_dec_keep_the_carry_flag() -> None:
    cpu, _ = run("stc\nmov ecx, 1\ndec ecx\nhlt")
    assert cpu.rflags & (CF | ZF) == CF | ZF


def test_loop_counts_rcx_down() -> None:
    cpu, _ = run("xor eax, eax\nmov ecx, 5\nl: add eax, 2\nloop l\nhlt")
    assert (cpu.regs[0], cpu.regs[1]) == (10, 0)


def test_call_ret_push_pop_use_the_stack() -> None:
    cpu, bus = run("call f\nhlt\nf: push 0x1234\npop rbx\nret")
    assert cpu.regs[3] == 0x1234 and cpu.regs[4] == STACK
    writes = [e for e in bus.log if e[0] == "write"]
    assert writes[0][1:3] == (STACK - 8, 8)          # the return address


@pytest.mark.parametrize(("setup", "rsi_end"), [("mov rsi, 0x6000\nmov rdi, 0x6100", 0x6004),
                                               ("mov rsi, 0x6003\nmov rdi, 0x6103\nstd", 0x5FFF)])
def test_rep_movsb_copies_forward_and_backward_with_df(setup: str, rsi_end: int) -> None:
    cpu, bus = machine(f"{setup}\nmov ecx, 4\nrep movsb\ncld\nhlt")
    bus.mem[0x6000:0x6004] = b"wxyz"
    assert cpu.run(100) == "hlt"
    assert bytes(bus.mem[0x6100:0x6104]) == b"wxyz" and cpu.regs[6] == rsi_end and cpu.regs[1] == 0


def test_every_fetch_data_and_stack_access_goes_through_the_bus() -> None:
    """Instruction fetches, data accesses and pushes are all bus accesses."""
    _, bus = run("push rax\nmov rbx, [0x6000]\nhlt")
    kinds = [e[0] for e in bus.log]
    assert kinds.count("fetch") == 3 and ("write", STACK - 8, 8, False, False) in bus.log
    assert ("read", 0x6000, 8, False, False) in bus.log


def test_read_modify_write_reads_with_write_intent() -> None:
    """The load of ADD [m], r is a read-modify-write (a #PF on it reports W=1)."""
    _, bus = run("add [0x6000], rax\ncmp [0x6008], rax\nhlt")
    reads = [e for e in bus.log if e[0] == "read"]
    assert reads == [("read", 0x6000, 8, False, True), ("read", 0x6008, 8, False, False)]


def test_a_fault_delivers_through_the_idt_with_error_code_and_rf() -> None:
    """#PF pushes SS, RSP, RFLAGS (RF set for a fault), CS, RIP of the faulting instruction, the
    error code; CR2 holds the address; the handler runs at the gate's target."""
    cpu, bus = run("mov rbx, 1\nmov rax, [0xf008]\nhlt")
    frame = [int.from_bytes(bus.mem[STACK - 8 * i:STACK - 8 * i + 8], "little") for i in range(1, 7)]
    assert frame == [0x10, STACK, 0x2 | RF, 0x08, CODE + 7, 0]
    assert cpu.cr2 == 0xF008 and cpu.rip == HANDLER + 1 and cpu.regs[4] == STACK - 48


def test_a_fault_at_cpl3_switches_to_the_tss_stack() -> None:
    """From CPL3 the frame goes on TSS.RSP0, SS becomes the null selector, CPL becomes 0; the
    IDT gate, the GDT descriptor and RSP0 are implicit supervisor reads."""
    cpu, bus = run("mov rax, [0xf000]\nhlt", cpl=3)
    assert cpu.cpl == 0 and cpu.ss == 0 and cpu.regs[4] == 0x7000 - 48
    ss, rsp, _, cs = (int.from_bytes(bus.mem[0x7000 - 8 * i:0x7000 - 8 * i + 8], "little") for i in range(1, 5))
    assert (ss, rsp, cs) == (0x2B, 0x9000, 0x23)
    implicit = {(e[1], e[2]) for e in bus.log if e[3] and e[0] == "read"}
    assert {(IDT + 16 * 14, 8), (GDT + 8, 8), (TSS + 4, 8)} <= implicit


def test_hlt_and_privileged_instructions_fault_at_cpl3() -> None:
    """HLT, MOV CR, INVLPG at CPL3 are #GP(0)."""
    cpu, bus = run("hlt", cpl=3, handler="mov rax, [rsp]\nhlt")
    assert cpu.regs[0] == 0        # the error code on top of the frame


def test_non_canonical_address_is_gp() -> None:
    cpu, _ = run("mov rax, 0x8000000000000000\nmov rbx, [rax]\nhlt", handler="pop rcx\nhlt")
    assert cpu.regs[1] == 0 and cpu.rip == HANDLER + 2 and cpu.cr2 == 0


def test_iretq_returns_to_the_frame() -> None:
    cpu, _ = run("push 0x10\npush 0x8000\npushfq\npush 0x08\nlea rax, [rel back]\npush rax\niretq\n"
                 "hlt\nback: mov rbx, 9\nhlt")
    assert cpu.regs[3] == 9 and cpu.regs[4] == 0x8000


def test_fault_during_double_fault_is_a_triple_fault() -> None:
    """A #PF whose frame cannot be pushed becomes #DF; failing that too is a shutdown."""
    cpu, _ = machine("mov rsp, 0xf800\nmov rax, [0xf000]\nhlt")
    assert cpu.run(100) == "shutdown"


def test_step_limit_raises_a_typed_error() -> None:
    cpu, _ = machine("l: jmp l")
    with pytest.raises(StepLimitExceeded) as e:
        cpu.run(50)
    assert isinstance(e.value, KvmmuError) and "max_steps=50" in str(e.value)


def test_unimplemented_instruction_is_reported_not_guessed() -> None:
    cpu, _ = machine("cpuid\nhlt")
    with pytest.raises(UnsupportedInstruction, match="cpuid"):
        cpu.run(10)
