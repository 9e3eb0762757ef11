"""The software CPU itself: architectural state, the fetch-decode-execute loop, 64-bit exception
delivery, and operand access (addressing, canonical checks, the stack); instruction semantics are
the handlers the sibling modules register with `handles`."""

from __future__ import annotations

from collections.abc import Callable

import iced_x86 as ix

from ..undefined_flags import UndefinedFlags
from .bus import Bus, CpuFault, StepLimitExceeded, Stop, UnsupportedInstruction
from .constants import (
    DF_VEC,
    GP,
    GPR_SLICES,
    IF,
    M32,
    M64,
    MASKS,
    NT,
    PF_VEC,
    RF,
    RFLAGS_FIXED,
    RSP,
    SS_VEC,
    TF,
    UD,
    is_canonical,
)
from .flags import RflagsArithmetic

_I = ix.Mnemonic
_K = ix.OpKind
_R = ix.Register


_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
_CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})
_FAULT_CLASS = frozenset({0, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 19})   # RF is set in their frame


class X86Cpu(RflagsArithmetic):
    """Architectural state of one vCPU in 64-bit mode, and the interpreter loop."""

    def __init__(self, bus: Bus, *, rip: int, rsp: int, rflags: int, cpl: int, cr0: int, cr3: int,
                 cr4: int, efer: int, gdt: tuple[int, int], idt: tuple[int, int], tss: tuple[int, int],
                 cs: int | None = None, ss: int | None = None) -> None:
        self.bus = bus
        self.regs = [0] * 16
        self.regs[RSP] = rsp
        self.xmm = [0] * 16
        self.rip = rip
        self.rflags = rflags | RFLAGS_FIXED
        self.cpl = cpl
        self.cs = cs if cs is not None else (0x08 if cpl == 0 else 0x23)
        self.ss = ss if ss is not None else (0x10 if cpl == 0 else 0x2B)
        self.cr0, self.cr2, self.cr3, self.cr4, self.efer = cr0, 0, cr3, cr4, efer
        self.gdt, self.idt, self.tss = gdt, idt, tss
        self.steps = 0
        self.instr: ix.Instruction | None = None
        self._next_rip = rip
        self._delivering: int | None = None
        self._formatter = ix.Formatter(ix.FormatterSyntax.NASM)
        # SDM-undefined flags and where their images went (hw/undefined_flags.py): never compared
        self.undefined = UndefinedFlags()

    # -- register helpers --------------------------------------------------------------------------
    def get(self, reg: int) -> int:
        idx, size, shift = GPR_SLICES[reg]
        return (self.regs[idx] >> shift) & MASKS[size]

    def set(self, reg: int, value: int) -> None:
        idx, size, shift = GPR_SLICES[reg]
        if size == 8:
            self.regs[idx] = value & M64
        elif size == 4:
            self.regs[idx] = value & M32
        else:
            m = MASKS[size] << shift
            self.regs[idx] = (self.regs[idx] & ~m) | ((value << shift) & m)

    def text(self, instr: ix.Instruction | None = None) -> str:
        instr = instr or self.instr
        return self._formatter.format(instr) if instr is not None else "?"

    # -- running -----------------------------------------------------------------------------------
    def run(self, max_steps: int) -> str:
        """Execute until the bus stops the run; returns the reason ("hlt", "shutdown", ...)."""
        limit = self.steps + max_steps
        while True:
            if self.steps >= limit:
                raise StepLimitExceeded(max_steps, self.rip)
            try:
                self.step()
            except Stop as stop:
                return stop.reason

    def step(self) -> None:
        self.steps += 1
        bus = self.bus
        bus.begin(self)
        try:
            instr = self._decode()
            self.instr = instr
            self._next_rip = instr.next_ip
            self.undefined.before(self, instr)
            self._execute(instr)
        except CpuFault as fault:
            bus.abort(self, fault)
            self.deliver(fault.vector, fault.error_code, fault.cr2, self.rip)
            return
        if instr.mnemonic not in (_I.IRETQ, _I.POPFQ, _I.POPF):
            self.rflags &= ~RF              # RF is cleared when an instruction completes
        self.undefined.after(self, instr)
        bus.commit(self)

    def _decode(self) -> ix.Instruction:
        rip = self.rip
        if not is_canonical(rip):
            raise CpuFault(GP, 0)
        n = min(15, 0x1000 - (rip & 0xFFF))
        data = self.bus.fetch(rip, n, self.cpl)
        dec = ix.Decoder(64, data, ip=rip)
        instr = dec.decode()
        if instr.code == ix.Code.INVALID and dec.last_error == ix.DecoderError.NO_MORE_BYTES and n < 15:
            data += self.bus.fetch((rip + n) & M64, 15 - n, self.cpl)
            dec = ix.Decoder(64, data, ip=rip)
            instr = dec.decode()
        if instr.code == ix.Code.INVALID:
            raise CpuFault(UD)
        return instr

    # -- exceptions ---------------------------------------------------------------------------------
    def deliver(self, vector: int, error_code: int | None, cr2: int | None, rip: int) -> None:
        """Deliver an exception through the 64-bit IDT (double and triple fault included)."""
        force_df = False
        while True:
            first = self._delivering
            if first is not None:               # a fault while delivering `first`
                if first == DF_VEC:
                    self._delivering = None
                    raise Stop("shutdown", f"triple fault: vector {vector} while delivering #DF")
                if force_df or (first in _CONTRIBUTORY and vector in _CONTRIBUTORY) or \
                        (first == PF_VEC and (vector in _CONTRIBUTORY or vector == PF_VEC)):
                    vector, error_code, cr2 = DF_VEC, 0, None
            if vector == PF_VEC and cr2 is not None:
                self.cr2 = cr2
            if vector in _FAULT_CLASS:
                self.rflags |= RF                 # as KVM does before injecting a fault (kept on failure)
            self._delivering = vector
            try:
                self._deliver(vector, error_code, rip)
            except CpuFault as nested:
                force_df = bool(self.bus.deliver_failed(self, vector))
                vector, error_code, cr2 = nested.vector, nested.error_code, nested.cr2
                continue
            except BaseException:
                self._delivering = None
                raise
            self._delivering = None
            return

    def _deliver(self, vector: int, error_code: int | None, rip: int) -> None:
        bus = self.bus
        bus.deliver_begin(self, vector)
        idt_base, idt_limit = self.idt
        if 16 * vector + 15 > idt_limit:
            raise CpuFault(GP, vector * 8 + 2)
        lo = bus.read(idt_base + 16 * vector, 8, 0, implicit=True)
        hi = bus.read(idt_base + 16 * vector + 8, 8, 0, implicit=True)
        gate_type = (lo >> 40) & 0xF
        if not (lo >> 47) & 1 or gate_type not in (0xE, 0xF):
            raise CpuFault(GP, vector * 8 + 2)
        selector = (lo >> 16) & 0xFFFF
        target = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000) | ((hi & M32) << 32)
        if selector & 3 or selector & 4 or not selector & ~7:
            raise CpuFault(GP, selector & ~3)
        new_cpl = 0                       # the runtime's gates all lead to ring 0 code
        old_ss, old_rsp, old_cs = self.ss, self.regs[RSP], self.cs
        rflags = self.rflags
        if new_cpl < self.cpl:
            rsp = bus.read(self.tss[0] + 4 + 8 * new_cpl, 8, 0, implicit=True)
            new_ss = 0
        else:
            rsp, new_ss = old_rsp, self.ss
        rsp &= ~0xF
        frame = [old_ss, old_rsp, rflags, old_cs, rip]
        if vector in _ERROR_CODE_VECTORS:
            frame.append(error_code or 0)
        for value in frame:
            rsp = (rsp - 8) & M64
            bus.write(rsp, 8, value & M64, new_cpl, implicit=True)
        self.undefined.frame(rsp, len(frame), len(frame) - 3)     # frame[2] is RFLAGS
        desc = self._descriptor(selector)      # CS is loaded after the frame is written (as measured)
        if (desc >> 45) & 3 != new_cpl or not (desc >> 47) & 1 or not (desc >> 43) & 1:
            raise CpuFault(GP, selector & ~3)
        self.regs[RSP] = rsp
        self.cs, self.ss, self.cpl = selector, new_ss, new_cpl
        self.rip = target
        self.rflags &= ~(TF | NT | RF | (IF if gate_type == 0xE else 0))
        bus.deliver_end(self, vector)

    def _descriptor(self, selector: int) -> int:
        base, limit = self.gdt
        index = selector & ~7
        if selector & 4 or index + 7 > limit or index == 0:
            raise CpuFault(GP, selector & ~3)
        return self.bus.read(base + index, 8, 0, implicit=True)

    # -- operand access -----------------------------------------------------------------------------
    def ea(self, instr: ix.Instruction) -> int:
        base = instr.memory_base
        if base == _R.RIP:
            return instr.memory_displacement & M64
        addr = instr.memory_displacement
        if base != _R.NONE:
            addr += self.get(base)
        index = instr.memory_index
        if index != _R.NONE:
            addr += self.get(index) * instr.memory_index_scale
        return addr & M64

    def _check(self, addr: int, size: int) -> None:
        """SDM: an access with any byte outside the canonical range is #GP(0) (#SS for the stack).
        A bus may let an access whose first byte is canonical go on (KVM's emulator checks no more)."""
        if not is_canonical(addr) or (not is_canonical((addr + size - 1) & M64)
                                    and not self.bus.noncanonical_tail(self)):
            raise CpuFault(SS_VEC if self._stack_ref else GP, 0)

    _stack_ref = False

    def load(self, addr: int, size: int, rmw: bool = False, restart: bool = False) -> int:
        self._check(addr, size)
        if restart:
            return self.bus.read(addr, size, self.cpl, False, rmw, restart=True)
        return self.bus.read(addr, size, self.cpl, False, rmw)

    def store(self, addr: int, size: int, value: int) -> None:
        self._check(addr, size)
        self.bus.write(addr, size, value & MASKS[size], self.cpl)

    def op_size(self, instr: ix.Instruction, i: int) -> int:
        kind = instr.op_kind(i)
        if kind == _K.REGISTER:
            reg = instr.op_register(i)
            if reg in GPR_SLICES:
                return GPR_SLICES[reg][1]
            return ix.RegisterExt.size(reg)
        if kind == _K.MEMORY:
            return ix.MemorySizeExt.size(instr.memory_size)
        return {_K.IMMEDIATE8: 1, _K.IMMEDIATE16: 2, _K.IMMEDIATE32: 4, _K.IMMEDIATE64: 8,
                _K.IMMEDIATE8TO16: 2, _K.IMMEDIATE8TO32: 4, _K.IMMEDIATE8TO64: 8,
                _K.IMMEDIATE32TO64: 8}.get(kind, 8)

    def read_op(self, instr: ix.Instruction, i: int, size: int | None = None, rmw: bool = False) -> int:
        """Operand i; ``rmw``: a memory read of a read-modify-write, which the CPU translates with
        write intent (a fault on it has W=1 in its error code and sets D)."""
        kind = instr.op_kind(i)
        if kind == _K.REGISTER:
            reg = instr.op_register(i)
            if reg in GPR_SLICES:
                return self.get(reg)
            if ix.RegisterExt.is_xmm(reg):
                return self.xmm[reg - _R.XMM0]
            raise UnsupportedInstruction(self.rip, self.text(instr), f"register operand {reg}")
        if kind == _K.MEMORY:
            return self.load(self.ea(instr), size or self.op_size(instr, i), rmw)
        if kind in (_K.IMMEDIATE8, _K.IMMEDIATE16, _K.IMMEDIATE32, _K.IMMEDIATE64, _K.IMMEDIATE8TO16,
                    _K.IMMEDIATE8TO32, _K.IMMEDIATE8TO64, _K.IMMEDIATE32TO64):
            return instr.immediate(i) & MASKS[size or self.op_size(instr, i)]
        raise UnsupportedInstruction(self.rip, self.text(instr), f"operand kind {kind}")

    def write_op(self, instr: ix.Instruction, i: int, value: int, size: int | None = None) -> None:
        kind = instr.op_kind(i)
        if kind == _K.REGISTER:
            reg = instr.op_register(i)
            if reg in GPR_SLICES:
                self.set(reg, value)
                return
            if ix.RegisterExt.is_xmm(reg):
                self.xmm[reg - _R.XMM0] = value & MASKS[16]
                return
            raise UnsupportedInstruction(self.rip, self.text(instr), f"register operand {reg}")
        if kind == _K.MEMORY:
            self.store(self.ea(instr), size or self.op_size(instr, i), value)
            return
        raise UnsupportedInstruction(self.rip, self.text(instr), f"destination kind {kind}")

    def push(self, value: int, size: int = 8) -> None:
        rsp = (self.regs[RSP] - size) & M64
        self._stack_ref = True
        try:
            self.store(rsp, size, value)
        finally:
            self._stack_ref = False
        self.regs[RSP] = rsp

    def pop(self, size: int = 8) -> int:
        self._stack_ref = True
        try:
            value = self.load(self.regs[RSP], size)
        finally:
            self._stack_ref = False
        return value

    # -- execution ---------------------------------------------------------------------------------
    def _execute(self, instr: ix.Instruction) -> None:
        handler = _HANDLERS.get(instr.mnemonic)
        if handler is None:
            raise UnsupportedInstruction(self.rip, self.text(instr))
        if instr.has_lock_prefix and instr.mnemonic not in _LOCKABLE:
            raise CpuFault(UD)
        handler(self, instr)

    def advance(self) -> None:
        self.rip = self._next_rip

    def privileged(self) -> None:
        if self.cpl != 0:
            raise CpuFault(GP, 0)


# The instruction semantics, by mnemonic: the sibling modules register theirs with `handles` when the
# package imports them.
Handler = Callable[[X86Cpu, ix.Instruction], None]
_HANDLERS: dict[int, Handler] = {}
_LOCKABLE = {_I.ADD, _I.ADC, _I.SUB, _I.SBB, _I.AND, _I.OR, _I.XOR, _I.INC, _I.DEC, _I.NEG, _I.NOT, _I.XCHG,
             _I.XADD, _I.CMPXCHG, _I.BTS, _I.BTR, _I.BTC}


def handles(*mnemonics: int) -> Callable[[Handler], Handler]:
    """Register the decorated function as the semantics of these iced-x86 mnemonics."""
    def deco(fn: Handler) -> Handler:
        for m in mnemonics:
            _HANDLERS[m] = fn
        return fn
    return deco


def write_result(cpu: X86Cpu, instr: ix.Instruction, r: int, size: int, saved_flags: int) -> None:
    """Write an arithmetic result to operand 0; a faulting write leaves RFLAGS as they were."""
    try:
        cpu.write_op(instr, 0, r, size)
    except CpuFault:
        cpu.rflags = saved_flags
        raise
