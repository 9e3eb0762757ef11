"""A flat 64-bit long-mode machine state: GDT, TSS, IDT, identity page tables and the sregs for them.

kvm_pvm only pages in long mode (32-bit and PAE paging are refused), so every real-KVM guest starts
here.  The images are plain bytes for ``vm.write_phys``; ``FlatLongMode.install`` does the lot.
"""

from __future__ import annotations

from dataclasses import dataclass
from struct import pack
from typing import TYPE_CHECKING

from ..errors import InvalidArgument
from .vcpu_state import DTable, Segment

if TYPE_CHECKING:
    from .vm import RealVcpu, RealVM

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

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_FIXED = 1 << 1

PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PS = 1 << 7


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


def identity_map_2m(pml4_base: int, size: int, user: bool = True) -> bytes:
    """Page tables mapping [0, size) to itself with 2 MiB pages, writable (and user if ``user``).

    Layout from ``pml4_base``: PML4, PDPT, then one PD per GiB; contiguous, 4 KiB each.
    """
    if pml4_base & 0xFFF or size <= 0 or size > 512 << 30:
        raise InvalidArgument("identity map", (pml4_base, size),
                              "needs a 4 KiB aligned base and a size in (0, 512 GiB]")
    flags = PTE_P | PTE_RW | (PTE_US if user else 0)
    n_pd = (size + (1 << 30) - 1) >> 30
    pml4 = pack("<Q", (pml4_base + 0x1000) | flags) + bytes(4088)
    pdpt = b"".join(pack("<Q", (pml4_base + 0x2000 + 0x1000 * i) | flags) for i in range(n_pd))
    pdpt += bytes(4096 - len(pdpt))
    n_pages = (size + (1 << 21) - 1) >> 21
    pds = b"".join(pack("<Q", (i << 21) | flags | PTE_PS) for i in range(n_pages))
    pds += bytes(n_pd * 4096 - len(pds))
    return pml4 + pdpt + pds


def flat_segments(cpl: int) -> dict[str, Segment]:
    """Flat code/data segments for CPL0 (selectors 0x08/0x10) or CPL3 (0x23/0x2b)."""
    if cpl not in (0, 3):
        raise InvalidArgument("cpl", cpl, "the flat long-mode layout has CPL0 and CPL3 selectors")
    code_sel, data_sel = (KERNEL_CS, KERNEL_DS) if cpl == 0 else (USER_CS, USER_DS)
    code = Segment(base=0, limit=0xFFFFFFFF, selector=code_sel, type=11, present=1, dpl=cpl,
                   db=0, s=1, l=1, g=1)
    data = Segment(base=0, limit=0xFFFFFFFF, selector=data_sel, type=3, present=1, dpl=cpl,
                   db=1, s=1, l=0, g=1)
    return {"cs": code, "ds": data, "es": data, "fs": data, "gs": data, "ss": data}


def flat_long_mode_sregs(gdt_base: int, idt_base: int, tss_base: int, cr3: int, cpl: int = 0,
                         idt_limit: int = 32 * 16 - 1, cr0: int = 0, cr4: int = 0,
                         efer: int = 0) -> dict[str, object]:
    """Keyword arguments for ``RealVcpu.set_sregs``: paging on, long mode active, flat segments.

    ``cr0``/``cr4``/``efer`` are ORed into the minimum (PG|WP|NE|ET|PE, PAE, LME|LMA).
    """
    sregs: dict[str, object] = dict(flat_segments(cpl))
    sregs["tr"] = Segment(base=tss_base, limit=TSS_SIZE - 1, selector=TSS_SEL, type=11, present=1,
                          dpl=0, db=0, s=0, l=0, g=0)
    sregs["gdt"] = DTable(gdt_base, GDT_LIMIT)
    sregs["idt"] = DTable(idt_base, idt_limit)
    sregs["cr0"] = CR0_PG | CR0_WP | CR0_NE | CR0_ET | CR0_PE | cr0
    sregs["cr3"] = cr3
    sregs["cr4"] = CR4_PAE | cr4
    sregs["efer"] = EFER_LME | EFER_LMA | efer
    return sregs


@dataclass(frozen=True, slots=True)
class FlatLongMode:
    """Where the system structures live in guest RAM (all must be inside memslots)."""

    gdt_base: int = 0x1000
    idt_base: int = 0x2000
    tss_base: int = 0x3000
    pml4_base: int = 0x10000
    rsp0: int = 0xA000            # CPL0 stack top used when an exception arrives from CPL3
    map_size: int = 4 << 30       # identity-mapped with 2 MiB user pages
    idt_vectors: int = 32

    def install(self, vm: RealVM, vcpu: RealVcpu, cpl: int = 0,
                handlers: int | dict[int, int] | None = None, cr0: int = 0, cr4: int = 0,
                efer: int = 0) -> None:
        """Write GDT, TSS, IDT (empty unless ``handlers``) and page tables; load the sregs."""
        vm.write_phys(self.gdt_base, gdt_image(self.tss_base))
        vm.write_phys(self.tss_base, tss_image(self.rsp0))
        idt = (idt_image(handlers, self.idt_vectors) if handlers is not None
               else bytes(16 * self.idt_vectors))
        vm.write_phys(self.idt_base, idt)
        vm.write_phys(self.pml4_base, identity_map_2m(self.pml4_base, self.map_size))
        vcpu.set_sregs(**flat_long_mode_sregs(self.gdt_base, self.idt_base, self.tss_base,
                                              self.pml4_base, cpl, 16 * self.idt_vectors - 1,
                                              cr0, cr4, efer))
