"""Exception deliveries that fail, and where kvm_pvm's emulation entries end.

Measured on this host (KVM delivers every exception in software):

- an emulation entry (CPL0) ends when an exception is queued, not at IRETQ: IRETQ to CPL0 then HLT
  is one exit; a #PF whose handler halts is two;
- a fault while delivering any exception — a benign #UD or #BP too — becomes #DF (the SDM delivers
  the second exception when the first is benign), and the failed delivery costs no exit: an
  escalation to a triple fault is one KVM_EXIT_SHUTDOWN;
- an exception frame that would land on MMIO (RSP, or TSS.RSP0 from CPL3) fails the delivery: no
  KVM_EXIT_MMIO, the escalation ends in KVM_EXIT_SHUTDOWN with RIP at the faulting instruction;
- UD0 is an emulation failure where KVM's emulator runs it (CPL0: KVM_EXIT_INTERNAL_ERROR; CPL3:
  #UD after the failed emulation);
- a stack that is not present, read-only or non-canonical (RSP at CPL0, TSS.RSP0 from CPL3) fails
  the delivery; a gate whose selector is beyond the GDT limit is #GP, hence #DF; a gate whose target
  is non-canonical delivers, and the fetch at the target is #GP again, through the same gate, until
  the frames have run the kernel stack down into the fault log (a long, deterministic loop).
Gates are made not present by zeroing their IDT entries.
"""

from struct import pack

from kvmmu.guest.runtime import RT_IDT, RT_TSS, Map, Program, both_rings

MMIO = 0xD000_0000
NP = 0x60_0000


def _no_gate(*vectors: int) -> dict[int, bytes]:
    return {RT_IDT + 16 * v: bytes(16) for v in vectors}


def _gate(vector: int, selector: int, target: int) -> dict[int, bytes]:
    """An interrupt gate (type 0xE, DPL0, present) of our own."""
    return {RT_IDT + 16 * vector: pack("<HHBBHII", target & 0xFFFF, selector, 0, 0x8E, (target >> 16) & 0xFFFF,
                                       (target >> 32) & 0xFFFFFFFF, 0)}


def _stack(name: str, doc: str, stack: int, maps: tuple[Map, ...] = ()) -> list[Program]:
    """A #GP whose frame goes to `stack`: RSP at CPL0, TSS.RSP0 from CPL3."""
    return [Program(name=f"{name}_cpl0", cpl=0, doc=doc, maps=maps,
                    code=f"mov rsp, {stack:#x}\n{RAISE['gp']}\nhlt"),
            Program(name=f"{name}_cpl3", cpl=3, doc=doc, maps=maps, data={RT_TSS + 4: pack("<Q", stack)},
                    code=f"{RAISE['gp']}\nhlt")]


RAISE = {
    "pf": f"mov rax, [{NP:#x}]",
    "gp": "mov rax, 0x8000000000000000\nmov rbx, [rax]",
    "de": "xor ecx, ecx\ndiv ecx",
    "ud": "db 0xf0, 0x90            ; lock nop",
}
VECTOR = {"pf": 14, "gp": 13, "de": 0, "ud": 6}
NP_MAP = (Map(NP, 0x1000, flags="rw u np"),)

PROGRAMS = [
    Program(name="iretq_same_ring_cpl0", cpl=0, doc="IRETQ to CPL0 itself, then hlt: one exit",
            code="""
                mov rax, rsp
                push 0x10
                push rax
                pushfq
                push 0x08
                lea rax, [rel back]
                push rax
                iretq
            back: hlt"""),
    Program(name="iretq_same_ring_cpl3", cpl=3, doc="(CPL3 cannot IRETQ to itself here: a plain loop)",
            code="mov ecx, 3\nl: loop l\nhlt"),
    *both_rings(Program(name="pf_handler_halts", doc="a #PF whose handler halts for good",
                        maps=NP_MAP, code=RAISE["pf"] + "\nhlt")),
    *[p for name in RAISE for p in both_rings(Program(
        name=f"{name}_gate_not_present", doc=f"#{name.upper()} through a not-present gate: #DF is delivered",
        maps=NP_MAP, data=_no_gate(VECTOR[name]), code=RAISE[name] + "\nhlt"))],
    *[p for name in RAISE for p in both_rings(Program(
        name=f"{name}_triple_fault", doc=f"#{name.upper()} with its gate and #DF's not present: shutdown",
        maps=NP_MAP, data=_no_gate(VECTOR[name], 8), code=RAISE[name] + "\nhlt"))],
    Program(name="bp_gate_not_present_cpl3", cpl=3, doc="int3 through a not-present gate: #DF",
            data=_no_gate(3), code="int3\nhlt"),
    Program(name="bp_gate_not_present_cpl0", cpl=0, doc="int3 at CPL0: KVM's emulator fails on it",
            data=_no_gate(3), code="int3\nhlt"),
    *both_rings(Program(name="ud0", doc="UD0: an emulation failure where KVM's emulator runs it",
                        code="db 0x0f, 0xff\nhlt")),
    Program(name="frame_on_mmio_stack_cpl0", cpl=0, doc="#PF, then #GP, with RSP in MMIO: shutdown, no MMIO exit",
            maps=(Map(MMIO, 0x1000, flags="rw"), *NP_MAP),
            code=f"mov rsp, {MMIO + 0x800:#x}\n{RAISE['pf']}\nhlt"),
    Program(name="frame_on_mmio_stack_cpl3", cpl=3, doc="#PF from CPL3 with TSS.RSP0 in MMIO: shutdown",
            maps=(Map(MMIO, 0x1000, flags="rw"), *NP_MAP), data={RT_TSS + 4: pack("<Q", MMIO + 0x800)},
            code=f"{RAISE['pf']}\nhlt"),
    Program(name="push_to_mmio_stack_cpl0", cpl=0, doc="a plain push to an MMIO stack is an MMIO write exit",
            maps=(Map(MMIO, 0x1000, flags="rw"),), code=f"mov rsp, {MMIO + 0x800:#x}\npush rax\nhlt"),
    Program(name="push_to_mmio_stack_cpl3", cpl=3, doc="a plain push to an MMIO stack is an MMIO write exit",
            maps=(Map(MMIO, 0x1000, flags="rw u"),), code=f"mov rsp, {MMIO + 0x800:#x}\npush rax\nhlt"),
    *_stack("stack_not_present", "#GP with its frame going to a not-present page: shutdown", NP + 0x800, NP_MAP),
    *_stack("stack_read_only", "#GP with its frame going to a read-only page: shutdown", 0x61_0800,
            (Map(0x61_0000, 0x1000, flags="u"),)),
    *_stack("stack_non_canonical", "#GP with a non-canonical stack: shutdown", 0x8000_0000_0000_0800),
    *both_rings(Program(name="gate_selector_beyond_gdt", doc="the #GP gate's selector is beyond the GDT "
                        "limit: #GP while delivering, so #DF", data=_gate(13, 0x78, 0x8000),
                        code=RAISE["gp"] + "\nhlt")),
    *both_rings(Program(name="gate_non_canonical_target", doc="the #GP gate's target is non-canonical: "
                        "every delivery is followed by #GP at the target", data=_gate(13, 0x08, 1 << 63),
                        code=RAISE["gp"] + "\nhlt")),
]
