"""A flat 64-bit long-mode machine state: GDT, TSS, IDT, identity page tables and the sregs for them.

The descriptor images are `arch.descriptors`' (the same the guest runtime loads on the model).

kvm_pvm only pages in long mode (32-bit and PAE paging are refused), so every real-KVM guest starts
here.  The images are plain bytes for ``vm.write_phys``; ``FlatLongMode.install`` does the lot.
"""

from __future__ import annotations

from dataclasses import dataclass
from struct import pack
from typing import TYPE_CHECKING, TypedDict

from ..arch.bits import (
    EFER_LMA,
    EFER_LME,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    X86_CR0_ET,
    X86_CR0_NE,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR0_WP,
    X86_CR4_PAE,
)
from ..arch.descriptors import (
    GDT_LIMIT,
    KERNEL_CS,
    KERNEL_DS,
    TSS_SEL,
    TSS_SIZE,
    USER_CS,
    USER_DS,
    gdt_image,
    idt_image,
    tss_image,
)
from ..errors import InvalidArgument
from .vcpu_state import DTable, Segment

if TYPE_CHECKING:
    from .vm import RealVcpu, RealVM


def identity_map_2m(pml4_base: int, size: int, user: bool = True) -> bytes:
    """Page tables mapping [0, size) to itself with 2 MiB pages, writable (and user if ``user``).

    Layout from ``pml4_base``: PML4, PDPT, then one PD per GiB; contiguous, 4 KiB each.
    """
    if pml4_base & 0xFFF or size <= 0 or size > 512 << 30:
        raise InvalidArgument("identity map", (pml4_base, size),
                              "needs a 4 KiB aligned base and a size in (0, 512 GiB]")
    flags = PT_PRESENT_MASK | PT_WRITABLE_MASK | (PT_USER_MASK if user else 0)
    n_pd = (size + (1 << 30) - 1) >> 30
    pml4 = pack("<Q", (pml4_base + 0x1000) | flags) + bytes(4088)
    pdpt = b"".join(pack("<Q", (pml4_base + 0x2000 + 0x1000 * i) | flags) for i in range(n_pd))
    pdpt += bytes(4096 - len(pdpt))
    n_pages = (size + (1 << 21) - 1) >> 21
    pds = b"".join(pack("<Q", (i << 21) | flags | PT_PAGE_SIZE_MASK) for i in range(n_pages))
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


class LongModeSregs(TypedDict):
    """The keyword arguments ``flat_long_mode_sregs`` gives ``RealVcpu.set_sregs`` (KVM_SET_SREGS
    fields), typed so that ``set_sregs(**...)`` is checked field by field."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    gdt: DTable
    idt: DTable
    cr0: int
    cr3: int
    cr4: int
    efer: int


def flat_long_mode_sregs(gdt_base: int, idt_base: int, tss_base: int, cr3: int, cpl: int = 0,
                         idt_limit: int = 32 * 16 - 1, cr0: int = 0, cr4: int = 0,
                         efer: int = 0) -> LongModeSregs:
    """Keyword arguments for ``RealVcpu.set_sregs``: paging on, long mode active, flat segments.

    ``cr0``/``cr4``/``efer`` are ORed into the minimum (PG|WP|NE|ET|PE, PAE, LME|LMA).
    """
    seg = flat_segments(cpl)
    return LongModeSregs(
        cs=seg["cs"], ds=seg["ds"], es=seg["es"], fs=seg["fs"], gs=seg["gs"], ss=seg["ss"],
        tr=Segment(base=tss_base, limit=TSS_SIZE - 1, selector=TSS_SEL, type=11, present=1,
                   dpl=0, db=0, s=0, l=0, g=0),
        gdt=DTable(gdt_base, GDT_LIMIT),
        idt=DTable(idt_base, idt_limit),
        cr0=X86_CR0_PG | X86_CR0_WP | X86_CR0_NE | X86_CR0_ET | X86_CR0_PE | cr0,
        cr3=cr3,
        cr4=X86_CR4_PAE | cr4,
        efer=EFER_LME | EFER_LMA | efer,
    )


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
