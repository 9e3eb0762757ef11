"""High guest-physical addresses against the guest MAXPHYADDR the VMM's CPUID sets.

The real backend installs KVM_GET_SUPPORTED_CPUID, so the guest's MAXPHYADDR is the host's width
(48 bits on some of these machines, 46 on others); the addresses are built from the width measured
on the machine running the program, so the program means the same on every host:

- a PTE frame with bit MAXPHYADDR-1 set is an ordinary GPA above RAM: no memslot, so an MMIO exit;
- a PTE frame with bit MAXPHYADDR set, or bit 51, sets a reserved bit: #PF with P and RSVD in the
  error code (SDM Vol. 3A 4.5.4; without KVM_SET_CPUID2 KVM would use 36 bits and fault on the first
  one too).
"""

from kvmmu.guest.runtime import Map, Program, both_rings
from kvmmu.real import host_guest_paging

WIDTH = host_guest_paging()[0]
DATA = 0x60_0000
HIGH_GPA = (1 << (WIDTH - 1)) | 0x5000          # the top valid physical-address bit
RSVD_GPA = (1 << WIDTH) | 0x6000                # the lowest reserved bit
BIT51_GPA = (1 << 51) | 0x7000                  # the highest bit a frame field can hold

PROGRAMS = both_rings(Program(
    name="pte_frame_above_maxphyaddr",
    doc=f"PTE frames with bit {WIDTH - 1} (MMIO exit), bit {WIDTH} and bit 51 (RSVD #PF) set; "
        f"guest MAXPHYADDR {WIDTH} from the supported CPUID",
    maps=(Map(DATA, 0x1000, flags="rw u"), Map(0x70_0000, 0x1000, HIGH_GPA, "rw u"),
          Map(0x70_1000, 0x1000, RSVD_GPA, "rw u"), Map(0x70_2000, 0x1000, BIT51_GPA, "rw u")),
    faults={"pf": "resume"},
    code=f"""
        mov rsi, {DATA:#x}
        mov eax, [0x700000]
        mov [rsi], rax
        mov qword [RT_FIXUP], f1
        mov ecx, [0x701000]
    f1: mov qword [RT_FIXUP], f2
        mov dword [0x702000], 7
    f2: mov [rsi + 8], rcx
        hlt
    """))
