"""Where the host's memory management shows through: lazily allocated guest RAM.

These programs run with ``prefault=False``: the VMM does not populate guest RAM up front, so the
host allocates it lazily; the host profiles model that (``Host(prealloc=False)``).

- host_zero_page: a page the VMM never wrote is read, then written, at CPL3.  The read fault maps
  the host zero page; the write fault COWs it, the MMU notifier zaps the spte and the fault
  retries.  At CPL0 KVM's emulator copies through the VMM mapping: no difference.
- large_page_prefetch: a 2 MiB guest page on 4 KiB host pages is mapped by a direct shadow page;
  KVM prefetches the neighbours of each faulting 4 KiB piece (direct_pte_prefetch), but only host
  pages that are already present (an atomic get-user-pages), here the ones the VMM wrote.
- readonly_slot_prefetch: the same over a read-only slot (populated): KVM never prefetches from it
  (the prefetch asks for a writable host address).
- gpte_prefetch_absent: 4 KiB guest pages with A set; FNAME(pte_prefetch) maps the neighbours of the
  faulting one in order and stops at the first whose host page the VMM never wrote.
"""

from kvmmu.guest.runtime import Map, Program, Slot, both_rings

DATA = 0x60_0000

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

readonly = Program(
    name="readonly_slot_prefetch",
    doc="two reads inside a guest 2 MiB page over a read-only slot",
    slots=(Slot(0, 0, 8 << 20), Slot(1, 0x80_0000, 0x20_0000, 2)),
    maps=(Map(0x4000_0000, 0x20_0000, 0x80_0000, "u 2m"), Map(DATA, 0x1000, flags="rw u")),
    data={0x80_5000: b"\x05" * 8, 0x9f_f000: b"\x0f" * 8},
    code="""
        mov rdi, 0x40000000
        mov rax, [rdi + 0x5000]
        mov rbx, [rdi + 0x1ff000]
        mov rsi, 0x600000
        mov [rsi], rax
        mov [rsi + 8], rbx
        hlt
    """)

BASE = 0x70_0000
gptes = Program(
    name="gpte_prefetch_absent", prefault=False,
    doc="one read among eight accessed 4 KiB guest pages, some never written by the VMM",
    maps=tuple(Map(BASE + 0x1000 * i, 0x1000, 0x64_0000 + 0x1000 * i, "rw u a") for i in range(8)),
    data={0x64_0000 + 0x1000 * i: bytes([i + 1]) * 8 for i in (0, 1, 2, 4, 6)},
    code=f"""
        mov rdi, {BASE:#x}
        mov rax, [rdi + 0x1000]
        mov rbx, [rdi + 0x4000]
        mov rcx, [rdi + 0x6000]
        hlt
    """)

PROGRAMS = [*both_rings(zero), *both_rings(large), *both_rings(readonly), *both_rings(gptes)]
