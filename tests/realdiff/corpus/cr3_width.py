"""MOV to CR3 with bits above the guest MAXPHYADDR: #GP(0), and CR3 keeps its value.

KVM's kvm_set_cr3 refuses a CR3 that kvm_vcpu_is_legal_cr3 rejects (bits 63:MAXPHYADDR; bit 63 is
exempt only with CR4.PCIDE, bits 61/62 only with LAM), and the SDM makes MOV CR3 with a reserved
bit a #GP(0).  The width is the one the real backend's CPUID gives the guest here.  The MOV runs in
the runtime's service routine at CPL0 (at CPL3 reached through ``svc``); the #GP handler skips the
3-byte ``mov cr3, rdi`` and returns into the routine.  After the refused writes a legal reload
(the same value) and a read show that paging still uses the old tables.
"""

from kvmmu.guest.runtime import Map, Program, both_rings
from kvmmu.real import host_guest_paging

WIDTH = host_guest_paging()[0]
DATA = 0x60_0000

PROGRAMS = both_rings(Program(
    name="cr3_above_maxphyaddr",
    doc=f"MOV CR3 with bit {WIDTH} (the guest MAXPHYADDR), bit 51 and bit 63 (CR4.PCIDE=0): three "
        "#GP(0); then a reload of the same CR3",
    maps=(Map(DATA, 0x1000, flags="rw u"),),
    data={DATA: b"\x5a" * 8},
    faults={"gp": "add qword [rsp+48], 3\njmp rt_iret"},
    code=f"""
        mov rdi, CR3_0
        bts rdi, {WIDTH}
        mov eax, 2
        svc
        mov rdi, CR3_0
        bts rdi, 51
        mov eax, 2
        svc
        mov rdi, CR3_0
        bts rdi, 63
        mov eax, 2
        svc
        mov rdi, CR3_0
        mov eax, 2
        svc
        mov rbx, [{DATA:#x}]
        mov [{DATA + 8:#x}], rbx
        hlt
    """))
