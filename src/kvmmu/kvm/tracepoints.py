"""The tracepoints the model emits, with the fields and the TP_printk layout of Linux 6.1.

Each event belongs to a subsystem as in the kernel: `kvm` (arch/x86/kvm/trace.h and
include/trace/events/kvm.h) and `kvmmmu` (arch/x86/kvm/mmu/mmutrace.h).  What KVM has no
tracepoint for but the model can still show (a memslot update, a host swap-in, the result of a
fault) lives in the model's own subsystem `kvmmu`, never under a KVM name.  `format_event` renders
an event's fields the way `trace-cmd report` prints the kernel's event; `select_events` turns
trace-cmd style selections (`-e kvm`, `-e 'kvmmmu:*mmio*'`, `-e kvm_exit`) into names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from ..arch.bits import (
    PT64_NX_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    VMX_EPT_EXECUTABLE_MASK,
    VMX_EPT_READABLE_MASK,
    VMX_EPT_WRITABLE_MASK,
)
from ..errors import InvalidArgument
from .mmu.page import (
    ROLE_AD_DISABLED,
    ROLE_DIRECT,
    ROLE_EFER_NX,
    ROLE_HAS_4_BYTE_GPTE,
    ROLE_INVALID,
    role_access,
    role_level,
    role_quadrant,
)

Fields = dict[str, Any]

# PFERR bits as kvm_mmu_trace_pferr_flags prints them (mmutrace.h).
_PFERR_FLAGS = ((1, "P"), (2, "W"), (4, "U"), (8, "RSVD"), (16, "F"))
_ACCESS_STR = ("---", "--x", "w--", "w-x", "-u-", "-ux", "wu-", "wux")
_EXC_NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF", 10: "#TS",
              11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC"}
# Exit reasons by ISA (uapi/asm/vmx.h VMX_EXIT_REASONS, uapi/asm/svm.h SVM_EXIT_REASONS).
VMX_EXIT_REASONS = {0: "EXCEPTION_NMI", 2: "TRIPLE_FAULT", 12: "HLT", 14: "INVLPG", 28: "CR_ACCESS",
                    30: "IO_INSTRUCTION", 31: "MSR_READ", 32: "MSR_WRITE", 48: "EPT_VIOLATION",
                    49: "EPT_MISCONFIG"}
SVM_EXIT_REASONS = {0x013: "write_cr3", 0x04E: "PF excp", 0x078: "hlt", 0x079: "invlpg", 0x07B: "io",
                    0x07C: "msr", 0x07F: "shutdown", 0x400: "npf"}
KVM_ISA_VMX, KVM_ISA_SVM = 1, 2
KVM_EXIT_REASONS = {0: "KVM_EXIT_UNKNOWN", 2: "KVM_EXIT_IO", 5: "KVM_EXIT_HLT", 6: "KVM_EXIT_MMIO",
                    8: "KVM_EXIT_SHUTDOWN", 17: "KVM_EXIT_INTERNAL_ERROR"}
_MMIO_TYPES = ("unsatisfied-read", "read", "write")
_EMUL_MODES = {"real": "real", "prot16": "prot16", "prot32": "prot32", "prot64": "prot64"}


def print_flags(value: int, table: tuple[tuple[int, str], ...] = _PFERR_FLAGS) -> str:
    """__print_flags(value, "|", table): the names of the set bits, then what no name covers."""
    names, rest = [], value
    for bit, name in table:
        if value & bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names)


def exit_reason_name(reason: int, isa: int) -> str:
    table = VMX_EXIT_REASONS if isa == KVM_ISA_VMX else SVM_EXIT_REASONS
    return table.get(reason, f"{reason:#x}" if isa == KVM_ISA_SVM else str(reason))


def _ptr(value: int) -> str:
    """%p: the kernel prints a pointer as a hashed id, 16 hex digits without 0x (lib/vsprintf.c);
    the model prints its spte's host address in the same shape."""
    return f"{value:016x}"


def _page(f: Fields) -> str:
    """KVM_MMU_PAGE_PRINTK: a shadow page with its decoded role word."""
    role = f["role"]
    level, four = role_level(role), role & ROLE_HAS_4_BYTE_GPTE
    quadrant, direct, access = role_quadrant(role), role & ROLE_DIRECT, role_access(role)
    invalid, efer_nx, ad_disabled = role & ROLE_INVALID, role & ROLE_EFER_NX, role & ROLE_AD_DISABLED
    return (f"sp gen {f.get('mmu_valid_gen', 0)} gfn {f['gfn']:x} l{level} {4 if four else 8}-byte q{quadrant}"
            f"{' direct' if direct else ''} {_ACCESS_STR[access]}{' invalid' if invalid else ''}"
            f" {'' if efer_nx else '!'}nxe {'!' if ad_disabled else ''}ad root {f.get('root_count', 0)} "
            f"{'unsync' if f.get('unsync') else 'sync'}")


def _spte_rwxu(f: Fields) -> str:
    spte, ept = f["spte"], f.get("ept", False)
    if ept:
        return (("r" if spte & VMX_EPT_READABLE_MASK else "-") + ("w" if spte & VMX_EPT_WRITABLE_MASK else "-")
                + ("x" if spte & VMX_EPT_EXECUTABLE_MASK else "-"))
    return ("r" + ("w" if spte & PT_WRITABLE_MASK else "-") + ("-" if spte & PT64_NX_MASK else "x")
            + ("u" if spte & PT_USER_MASK else "-"))


def _exit(f: Fields) -> str:
    return (f"vcpu {f['vcpu_id']} reason {exit_reason_name(f['exit_reason'], f['isa'])} rip {f.get('rip', 0):#x} "
            f"info1 0x{f.get('info1', 0):016x} info2 0x{f.get('info2', 0):016x} "
            f"intr_info 0x{f.get('intr_info', 0):08x} error_code 0x{f.get('error_code', 0):08x}")


def _userspace_exit(f: Fields) -> str:
    errno = f.get("errno", 0)
    if errno < 0:
        return f"reason {'restart' if errno == -4 else 'error'} ({-errno})"
    return f"reason {KVM_EXIT_REASONS.get(f['reason'], str(f['reason']))} ({f['reason']})"


def _emulate_insn(f: Fields) -> str:
    insn = " ".join(f"{b:02x}" for b in f.get("insn", b""))
    return (f"{f.get('csbase', 0):x}:{f.get('rip', 0):x}:{insn} ({_EMUL_MODES.get(f.get('mode', 'prot64'), 'prot64')})"
            f"{' failed' if f.get('failed') else ''}")


def _model(f: Fields) -> str:
    return " ".join(f"{k}={v:#x}" if isinstance(v, int) and not isinstance(v, bool) else f"{k}={v}"
                    for k, v in f.items())


_Fmt = Callable[[Fields], str]
# name -> (subsystem, TP_printk as a function of the fields)
TRACEPOINTS: dict[str, tuple[str, _Fmt]] = {
    # -- kvm -------------------------------------------------------------------------------------
    "kvm_entry": ("kvm", lambda f: f"vcpu {f['vcpu_id']}, rip {f.get('rip', 0):#x}"),
    "kvm_exit": ("kvm", _exit),
    "kvm_userspace_exit": ("kvm", _userspace_exit),
    "kvm_page_fault": ("kvm", lambda f: f"address {f['fault_address']:x} error_code {f['error_code']:x}"),
    "kvm_inj_exception": ("kvm", lambda f: f"{_EXC_NAMES.get(f['exception'], str(f['exception']))} "
                                           f"({f['error_code'] if f.get('has_error') else 0:#x})"),
    "kvm_emulate_insn": ("kvm", _emulate_insn),
    "kvm_mmio": ("kvm", lambda f: f"mmio {_MMIO_TYPES[f['type']]} len {f['len']} gpa {f['gpa']:#x} "
                                  f"val {f['val']:#x}"),
    "kvm_fast_mmio": ("kvm", lambda f: f"fast mmio at gpa {f['gpa']:#x}"),
    "kvm_cr": ("kvm", lambda f: f"cr_{'write' if f['rw'] else 'read'} {f['cr']:x} = {f['val']:#x}"),
    "vcpu_match_mmio": ("kvm", lambda f: f"gva {f['gva']:#x} gpa {f['gpa']:#x} "
                                         f"{'Write' if f['write'] else 'Read'} {'GPA' if f['gpa_match'] else 'GVA'}"),
    # -- kvmmmu ----------------------------------------------------------------------------------
    # fast_page_fault keeps the error code in a u32: an #NPF's PFERR_GUEST_* bits 32-33 are not printed.
    "kvm_mmu_pagetable_walk": ("kvmmmu", lambda f: f"addr {f['addr']:x} pferr {f['pferr']:x} "
                                                   f"{print_flags(f['pferr'])}"),
    "kvm_mmu_walker_error": ("kvmmmu", lambda f: f"pferr {f['pferr']:x} {print_flags(f['pferr'])}"),
    "kvm_mmu_get_page": ("kvmmmu", lambda f: f"{_page(f)} {'new' if f['created'] else 'existing'}"),
    "kvm_mmu_sync_page": ("kvmmmu", _page),
    "kvm_mmu_unsync_page": ("kvmmmu", _page),
    "kvm_mmu_prepare_zap_page": ("kvmmmu", _page),
    "mark_mmio_spte": ("kvmmmu", lambda f: f"sptep:{_ptr(f['sptep'])} gfn {f['gfn']:x} access {f['access']:x} "
                                           f"gen {f['gen']:x}"),
    "handle_mmio_page_fault": ("kvmmmu", lambda f: f"addr:{f['addr']:x} gfn {f['gfn']:x} access {f['access']:x}"),
    "fast_page_fault": ("kvmmmu", lambda f: f"vcpu {f['vcpu_id']} gva {f['cr2_or_gpa']:x} error_code "
                                            f"{print_flags(f['error_code'] & 0xFFFFFFFF)} sptep {_ptr(f['sptep'])} "
                                            f"old {f['old_spte']:#x} new {f['new_spte']:x} "
                                            f"spurious {int(f['ret'] == 'SPURIOUS')} fixed {int(f['ret'] == 'FIXED')}"),
    "kvm_mmu_zap_all_fast": ("kvmmmu", lambda f: f"kvm-mmu-valid-gen {f['mmu_valid_gen']} "
                                                 f"used_pages {f['mmu_used_pages']:x}"),
    "check_mmio_spte": ("kvmmmu", lambda f: f"spte {f['spte']:x} kvm_gen {f['kvm_gen']:x} "
                                            f"spte-gen {f['spte_gen']:x} valid {int(f['kvm_gen'] == f['spte_gen'])}"),
    "kvm_mmu_set_spte": ("kvmmmu", lambda f: f"gfn {f['gfn']:x} spte {f['spte']:x} ({_spte_rwxu(f)}) "
                                             f"level {f['level']} at {f['sptep']:x}"),
    "kvm_mmu_spte_requested": ("kvmmmu", lambda f: f"gfn {f['gfn']:x} pfn {f['pfn']:x} level {f['level']}"),
    "kvm_tdp_mmu_spte_changed": ("kvmmmu", lambda f: f"as id {f.get('as_id', 0)} gfn {f['gfn']:x} "
                                                     f"level {f['level']} old_spte {f['old_spte']:x} "
                                                     f"new_spte {f['new_spte']:x}"),
    "kvm_mmu_split_huge_page": ("kvmmmu", lambda f: f"gfn {f['gfn']:x} spte {f['spte']:x} level {f['level']} "
                                                    f"errno {f.get('errno', 0)}"),
    # -- kvmmu: what the model shows that KVM has no tracepoint for --------------------------------
    "memslot_update": ("kvmmu", _model),
    "mmio_generation_wrap": ("kvmmu", _model),
    "page_fault_done": ("kvmmu", _model),
    "write_tracked_gpte": ("kvmmu", _model),
    "host_swapin": ("kvmmu", _model),
    "host_unmap": ("kvmmu", _model),
    "nested_vmenter": ("kvmmu", _model),
    "nested_vmexit": ("kvmmu", _model),
    "nested_ept_fault": ("kvmmu", _model),
}
SUBSYSTEMS = ("kvm", "kvmmmu", "kvmmu")
DEFAULT_SUBSYSTEMS = ("kvm", "kvmmmu")       # what a real host would record with -e kvm -e kvmmmu


def subsystem(name: str) -> str:
    return TRACEPOINTS[name][0] if name in TRACEPOINTS else "kvmmu"


def format_event(name: str, fields: Fields) -> str:
    """The event's fields as the kernel's TP_printk prints them (an unknown event: key=value pairs)."""
    entry = TRACEPOINTS.get(name)
    return entry[1](fields) if entry is not None else _model(fields)


def select_events(patterns: list[str] | tuple[str, ...] | None) -> frozenset[str]:
    """trace-cmd's `-e` selections: a subsystem (`kvm`), `subsystem:glob` (`kvmmmu:*mmio*`), an event
    name or a glob over names (`kvm_mmu_*`).  None or empty: every KVM event (kvm and kvmmmu).  A
    pattern that names nothing is refused, as trace-cmd refuses an unknown event."""
    if not patterns:
        return frozenset(n for n, (s, _) in TRACEPOINTS.items() if s in DEFAULT_SUBSYSTEMS)
    chosen: set[str] = set()
    for raw in patterns:
        pat = raw.strip()
        if not pat:
            raise InvalidArgument("event", raw, "an event selection is an event, a subsystem or SYSTEM:GLOB")
        if pat in SUBSYSTEMS or pat == "all":
            hits = {n for n, (s, _) in TRACEPOINTS.items() if pat == "all" or s == pat}
        elif ":" in pat:
            sys_pat, _, ev_pat = pat.partition(":")
            hits = {n for n, (s, _) in TRACEPOINTS.items()
                    if fnmatch.fnmatchcase(s, sys_pat) and fnmatch.fnmatchcase(n, ev_pat or "*")}
        else:
            hits = {n for n in TRACEPOINTS if fnmatch.fnmatchcase(n, pat)}
        if not hits:
            raise InvalidArgument("event", raw, f"no such event; the subsystems are {', '.join(SUBSYSTEMS)} "
                                                "(`kvmmu trace --list` lists every event)")
        chosen |= hits
    return frozenset(chosen)
