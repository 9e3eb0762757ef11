"""KVM's unprotect-and-retry before emulating a faulting instruction, as kernels before 6.12 do it
(x86.c retry_instruction, called by x86_emulate_instruction after the decode).

When kvm_mmu_page_fault hands an instruction to the emulator it allows a retry
(EMULTYPE_ALLOW_RETRY_PF) unless the fault address is in the vCPU's MMIO cache or the vCPU runs a
nested guest.  Before 6.12 that is every other RET_PF_EMULATE, a write to a read-only memslot
included.  retry_instruction then declines for an instruction that is likely to write page tables
(the emulator's PageTable flag: MOV, OR, AND, XCHG, CMPXCHG, CMPXCHG8B/16B, BTS, BTC to memory) and
for a second fault at the same RIP and address; otherwise it unprotects the gfn
(kvm_mmu_unprotect_page: zaps the shadow pages that shadow a guest table there) and re-enters the
guest, which executes the instruction again: one more exit, page fault (pf_taken, pf_emulate) and
decode (insn_emulation) for an instruction that faults the same way again.

Linux 6.12 ("KVM: x86: Retry to-be-emulated insn in "slow" unprotect path iff sp is zapped" and the
RET_PF_WRITE_PROTECTED series) allows the retry only for a write-protected gfn, so a read-only
memslot never retries there; `VM(retry_pf_emulation=True)` selects the older behaviour (the
svm-* profiles: the lab's Debian 6.1 kernel).  Measured in the lab (tests/realdiff/lab/npt.json):
`add qword [ro], 7` faults twice at the same gpa before its write exits to userspace, a `mov` to the
same slot once; a 16-byte `movdqu` store into a read-only slot twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import iced_x86 as ix

from ..arch.bits import PFERR_USER_MASK, PFERR_WRITE_MASK
from ..arch.index import gpa_to_gfn

if TYPE_CHECKING:
    from .vcpu import Vcpu

_M = ix.Mnemonic
# The mnemonics of emulate.c's opcode table entries flagged PageTable (x86_page_table_writing_insn).
_PAGE_TABLE_WRITING = frozenset((_M.MOV, _M.OR, _M.AND, _M.XCHG, _M.CMPXCHG, _M.CMPXCHG8B, _M.CMPXCHG16B,
                                 _M.BTS, _M.BTC))


def page_table_writing_insn(instr: ix.Instruction) -> bool:
    """x86_page_table_writing_insn: the emulator's PageTable flag, which its table sets only on forms
    with a memory destination (MOV to a control register or from memory is not one)."""
    return instr.mnemonic in _PAGE_TABLE_WRITING and instr.op_count > 0 and \
        instr.op0_kind == ix.OpKind.MEMORY


def retry_instruction(vcpu: Vcpu, cr2_or_gpa: int) -> bool:
    """retry_instruction for a RET_PF_EMULATE of the full fault path: True if KVM re-enters the guest
    instead of emulating.  Called on every such emulation, as KVM calls it on every decode: the
    guard against retrying twice is reset each time."""
    last_eip, last_addr = vcpu.last_retry
    vcpu.last_retry = (0, 0)
    insn = vcpu.emul_insn
    if not vcpu.allow_retry_pf or insn is None:
        return False
    eip, writes_page_tables = insn
    if writes_page_tables or (eip == last_eip and cr2_or_gpa == last_addr):
        return False
    vcpu.last_retry = (eip, cr2_or_gpa)
    kvm = vcpu.vm.mmu
    if vcpu.mmu.direct:             # retry_instruction tests root_role.direct too
        gfn = gpa_to_gfn(cr2_or_gpa)
    else:
        from .mmu.paging import guest_walk
        # kvm_mmu_gva_to_gpa_write
        w = guest_walk(vcpu.mmu, cr2_or_gpa, PFERR_WRITE_MASK | (PFERR_USER_MASK if vcpu.cpl == 3 else 0))
        if w.fault:
            return True                           # an unmapped gva: nothing to unprotect
        gfn = gpa_to_gfn(w.gpa)
    kvm.unprotect_page(gfn)
    return True


__all__ = ["page_table_writing_insn", "retry_instruction"]
