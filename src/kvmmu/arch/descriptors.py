"""x86-64 system descriptors as bytes: a flat GDT with a 64-bit TSS descriptor, the TSS, IDT gates.

The layout is the one every guest of the project uses (the runtime's test guests, the real
backend's flat long-mode machines), so the model and /dev/kvm load the same images (SDM Vol. 3A:
"Segment Descriptors", "TSS Descriptor in 64-bit mode", "Task Management in 64-bit Mode",
"64-Bit Mode IDT").
"""

from __future__ import annotations

from struct import pack

from ..errors import InvalidArgument

# GDT layout.  0x18 (user data) sits right below 0x20 so that SYSRET with STAR[63:48] = 0x10
# lands on CS = 0x23, SS = 0x1b; 0x2b is the user data selector for everything else.
KERNEL_CS = 0x08
KERNEL_DS = 0x10
USER_DS_SYSRET = 0x1B
USER_CS = 0x23
USER_DS = 0x2B
TSS_SEL = 0x30

_GDT_ENTRIES = (
    0x0000000000000000,  # null
    0x00209A0000000000,  # 0x08: 64-bit code, DPL0
    0x00CF92000000FFFF,  # 0x10: data, DPL0, 4 GiB
    0x00CFF2000000FFFF,  # 0x18: data, DPL3 (SYSRET's SS)
    0x0020FA0000000000,  # 0x23: 64-bit code, DPL3
    0x00CFF2000000FFFF,  # 0x28: data, DPL3
)
TSS_SIZE = 0x68
GDT_LIMIT = 8 * (len(_GDT_ENTRIES) + 2) - 1   # + the 16-byte TSS descriptor


def gdt_image(tss_base: int) -> bytes:
    """The GDT above, with a 64-bit available TSS descriptor (type 9) at selector 0x30."""
    limit = TSS_SIZE - 1
    low = ((limit & 0xFFFF) | (tss_base & 0xFFFFFF) << 16 | 0x89 << 40
           | ((limit >> 16) & 0xF) << 48 | ((tss_base >> 24) & 0xFF) << 56)
    high = tss_base >> 32
    return pack(f"<{len(_GDT_ENTRIES)}Q", *_GDT_ENTRIES) + pack("<QQ", low, high)


def tss_image(rsp0: int, ist: tuple[int, ...] = ()) -> bytes:
    """A 64-bit TSS; RSP0 is the stack a CPL3 -> CPL0 exception switches to."""
    if len(ist) > 7:
        raise InvalidArgument("ist", ist, "a 64-bit TSS has 7 IST slots")
    ists = tuple(ist) + (0,) * (7 - len(ist))
    # reserved u32, rsp0..2, reserved u64, ist1..7, reserved u64, reserved u16, iomap base
    return pack("<I3QQ7QQHH", 0, rsp0, 0, 0, 0, *ists, 0, 0, TSS_SIZE)


def idt_gate(handler: int, selector: int = KERNEL_CS, dpl: int = 0, ist: int = 0,
             trap: bool = False) -> bytes:
    """One 16-byte IDT gate (interrupt gate unless ``trap``)."""
    attr = 0x80 | (dpl & 3) << 5 | (0xF if trap else 0xE)
    return pack("<HHBBHII", handler & 0xFFFF, selector, ist & 7, attr,
                (handler >> 16) & 0xFFFF, (handler >> 32) & 0xFFFFFFFF, 0)


def idt_image(handlers: int | dict[int, int], vectors: int = 32) -> bytes:
    """An IDT of ``vectors`` gates; an int sends every vector to one handler, a dict leaves gaps."""
    table = dict.fromkeys(range(vectors), handlers) if isinstance(handlers, int) else handlers
    return b"".join(idt_gate(table[v]) if v in table else bytes(16) for v in range(vectors))
