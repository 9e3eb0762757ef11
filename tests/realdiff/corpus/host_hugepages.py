"""Guest 2 MiB pages on huge host pages (``host_hugepages``: the VMM madvises MADV_HUGEPAGE).

At CPL3 KVM's shadow MMU maps a guest 2 MiB page with one 2 MiB spte when the host backs the
frame with a huge page (FNAME(page_fault): max_level = the guest walk's level;
kvm_mmu_hugepage_adjust), unless the frame holds a shadowed guest page table (disallow_lpage).
When a page of a huge-mapped frame becomes a page table, the huge spte is write-protected and the
next write replaces it by a 4 KiB table.  With ``prefault=False`` the first read maps the host's huge
zero page (a read-only 2 MiB spte); the write then allocates a huge page in its place, the MMU
notifier zaps the spte and the fault is retried.  At CPL0 KVM's emulator maps nothing: no spte.
"""

from kvmmu.guest.runtime import Map, Program, both_rings

DATA = 0x60_0000
BIG = 0xA0_0000                 # gva of a guest 2 MiB page over gpa [2 MiB, 4 MiB)

huge_rw = Program(
    name="huge_page_rw", host_hugepages=True,
    doc="read, write and read again inside a guest 2 MiB page over a huge host page",
    maps=(Map(BIG, 0x20_0000, 0x20_0000, "rw u 2m"), Map(DATA, 0x1000, flags="rw u")),
    data={0x32_3000: b"\x09" * 8},
    code=f"""
        mov rdi, {BIG:#x}
        mov rax, [rdi + 0x1000]
        mov qword [rdi + 0x1ff000], 2
        mov rbx, [rdi + 0x123000]
        mov rcx, [rdi + 0x1ff000]
        mov rsi, {DATA:#x}
        mov [rsi], rbx
        mov [rsi + 8], rcx
        hlt
    """)

huge_over_tables = Program(
    name="huge_page_over_tables", host_hugepages=True,
    doc="a guest 2 MiB page over gpa [0, 2 MiB), which holds the guest's page tables: mapped 4 KiB",
    maps=(Map(0x4000_0000, 0x20_0000, 0, "rw u 2m"), Map(DATA, 0x1000, flags="rw u")),
    code="""
        mov rdi, 0x40000000
        mov rax, [rdi + 0x1f8000]
        mov qword [rdi + 0x1f9000], 3
        mov rbx, [rdi + 0x1f9000]
        mov rsi, 0x600000
        mov [rsi], rbx
        hlt
    """)

TABLE = 0x30_0000               # inside the huge-mapped frame; becomes the page table of 0xC00000
huge_split = Program(
    name="huge_page_split", host_hugepages=True,
    doc="a page of a huge-mapped frame becomes a page table: the huge spte is write-protected, "
        "the next write replaces it by 4 KiB sptes",
    maps=(Map(BIG, 0x20_0000, 0x20_0000, "rw u 2m"), Map(DATA, 0x1000, flags="rw u")),
    data={TABLE: (DATA | 7).to_bytes(8, "little"), DATA: b"\x44" * 8},
    code=f"""
        mov rdi, {BIG:#x}
        mov qword [rdi + 0x8000], 1
        mov rdi, pde({BIG:#x}) + 8
        mov rsi, {TABLE | 7:#x}
        mov eax, 3
        svc
        mov rdx, 0xc00000
        mov rbx, [rdx]
        mov rdi, {BIG:#x}
        mov rcx, [rdi + 0x100000]
        mov qword [rdi + 0x9000], 2
        mov r8, [rdi + 0x8000]
        mov rsi, {DATA:#x}
        mov [rsi + 8], rbx
        mov [rsi + 16], rcx
        mov [rsi + 24], r8
        hlt
    """)

huge_zero = Program(
    name="huge_page_zero", host_hugepages=True, prefault=False,
    doc="read, then write a guest 2 MiB page whose huge host page nobody wrote yet",
    maps=(Map(BIG, 0x20_0000, 0x20_0000, "rw u 2m"), Map(DATA, 0x1000, flags="rw u")),
    code=f"""
        mov rdi, {BIG:#x}
        mov rax, [rdi + 0x1000]
        mov qword [rdi + 0x1ff000], 2
        mov rbx, [rdi + 0x123000]
        mov rsi, {DATA:#x}
        mov [rsi], rbx
        hlt
    """)

PROGRAMS = [*both_rings(huge_rw), *both_rings(huge_over_tables), *both_rings(huge_split), *both_rings(huge_zero)]
