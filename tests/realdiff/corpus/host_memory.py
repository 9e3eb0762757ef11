"""Where the real host's memory management shows through (documented model gaps).

These programs run with ``prefault=False``: the VMM does not populate guest RAM up front, so the
real host allocates it lazily (the model's host has every page resident).

- host_zero_page: a page the VMM never wrote is read, then written, at CPL3.  The read fault maps
  the host zero page; the write fault COWs it, the MMU notifier zaps the spte and the fault
  retries.  At CPL0 KVM's emulator copies through the VMM mapping: no difference.
- large_page_prefetch: a 2 MiB guest page on 4 KiB host pages is mapped by a direct shadow page;
  KVM prefetches the neighbours of each faulting 4 KiB piece (direct_pte_prefetch), but only host
  pages that are already present (an atomic get-user-pages), here the ones the VMM wrote.
"""

from dataclasses import replace

from kvmmu.guest.runtime import Map, Program

DATA = 0x60_0000
ZERO_PAGE = ("host zero page: the read fault maps it read-only, the write fault COWs it and retries after "
             "the MMU notifier zaps the spte (pf_taken + 1, exits + 1, no pf_fixed); the model's host "
             "memory has no zero page")
PREFETCH = ("KVM prefetches only host pages that are present (kvm_prefetch_pages is atomic); the model "
            "prefetches every neighbour whose memslot exists (pages_4k)")

zero = Program(
    name="host_zero_page", prefault=False,
    doc="read then write a page the VMM never wrote",
    maps=(Map(DATA, 0x1000, flags="rw u"), Map(0x70_0000, 0x1000, 0x64_0000, "rw u")),
    data={DATA: bytes(64)},
    code="""
        mov rdx, 0x700000
        mov rbx, [rdx]
        mov qword [rdx + 8], 0x77
        mov rsi, 0x600000
        mov [rsi], rbx
        hlt
    """)

large = Program(
    name="large_page_prefetch", prefault=False,
    doc="three accesses inside a 2 MiB guest page backed by 4 KiB host pages",
    maps=(Map(0xA0_0000, 0x20_0000, 0x20_0000, "rw u 2m"),),
    data={0x20_0000: b"\x05" * 8, 0x32_3000: b"\x09" * 8},
    code="""
        mov rdi, 0xa00000
        mov qword [rdi + 0x1000], 1
        mov rax, [rdi + 0x123000]
        mov qword [rdi + 0x1ff000], 2
        hlt
    """)

PROGRAMS = [
    zero.at_cpl(0), replace(zero.at_cpl(3), expect={"counters": ZERO_PAGE}),
    large.at_cpl(0), replace(large.at_cpl(3), expect={"counters": PREFETCH}),
]
