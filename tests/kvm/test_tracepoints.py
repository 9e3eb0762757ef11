"""The model's events in KVM's vocabulary: names, subsystems and the TP_printk text of Linux 6.1.

Expected strings are written from the kernel's format strings (arch/x86/kvm/trace.h,
arch/x86/kvm/mmu/mmutrace.h, include/trace/events/kvm.h) and from lines a real KVM printed in the
nested lab (docs/real-kvm.md): `check_mmio_spte: spte 80000d0000017 kvm_gen 4 spte-gen 2 valid 0`.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.errors import InvalidArgument
from kvmmu.guest.pagetables import GuestPageTables, vm_writer
from kvmmu.kvm.tracepoints import format_event, select_events, subsystem

CR0 = X86_CR0_PG | X86_CR0_PE | X86_CR0_WP
MMIO_GVA, MMIO_GPA = 0x401000, 0xD0000000


def test_check_mmio_spte_prints_as_the_real_kvm_did() -> None:
    """The lab's real line: a stale MMIO spte of generation 2 seen at generation 4."""
    assert format_event("check_mmio_spte", {"spte": 0x80000D0000017, "kvm_gen": 4, "spte_gen": 2}) == \
        "spte 80000d0000017 kvm_gen 4 spte-gen 2 valid 0"


@pytest.mark.parametrize(("name", "fields", "text"), [
    ("mark_mmio_spte", {"sptep": 0xFFFF88810A3B5008, "gfn": 0xD0000, "access": 7, "gen": 4},
     "sptep:ffff88810a3b5008 gfn d0000 access 7 gen 4"),
    ("handle_mmio_page_fault", {"addr": 0xD0000000, "gfn": 0xD0000, "access": 6},
     "addr:d0000000 gfn d0000 access 6"),
    ("kvm_mmio", {"type": 0, "len": 4, "gpa": 0xD0000000, "val": 0},
     "mmio unsatisfied-read len 4 gpa 0xd0000000 val 0x0"),
    ("kvm_mmio", {"type": 2, "len": 8, "gpa": 0xFEE000B0, "val": 0x1234}, "mmio write len 8 gpa 0xfee000b0 val 0x1234"),
    ("kvm_inj_exception", {"exception": 14, "has_error": True, "error_code": 6}, "#PF (0x6)"),
    ("kvm_page_fault", {"fault_address": 0xFEE000B0, "error_code": 0x182}, "address fee000b0 error_code 182"),
    ("kvm_userspace_exit", {"reason": 6, "errno": 0}, "reason KVM_EXIT_MMIO (6)"),
    ("kvm_fast_mmio", {"gpa": 0xFE003000}, "fast mmio at gpa 0xfe003000"),
    ("kvm_cr", {"rw": 1, "cr": 3, "val": 0x14F000}, "cr_write 3 = 0x14f000"),
    ("kvm_entry", {"vcpu_id": 1, "rip": 0xFFFFFFFF81060A6E}, "vcpu 1, rip 0xffffffff81060a6e"),
    ("kvm_emulate_insn", {"csbase": 0, "rip": 0xFFFFFFFF81000000, "insn": bytes.fromhex("8b07"), "mode": "prot64",
                          "failed": False}, "0:ffffffff81000000:8b 07 (prot64)"),
    ("kvm_mmu_pagetable_walk", {"addr": 0x401000, "pferr": 0x6}, "addr 401000 pferr 6 W|U"),
    ("kvm_mmu_pagetable_walk", {"addr": 0x401000, "pferr": 0x19}, "addr 401000 pferr 19 P|RSVD|F"),
    ("kvm_mmu_zap_all_fast", {"mmu_valid_gen": 0, "mmu_used_pages": 0x1F}, "kvm-mmu-valid-gen 0 used_pages 1f"),
    ("vcpu_match_mmio", {"gva": 0x401000, "gpa": 0xD0000000, "write": False, "gpa_match": False},
     "gva 0x401000 gpa 0xd0000000 Read GVA"),
    ("kvm_tdp_mmu_spte_changed", {"as_id": 0, "gfn": 0x100, "level": 1, "old_spte": 0, "new_spte": 0xB7},
     "as id 0 gfn 100 level 1 old_spte 0 new_spte b7"),
])
def test_fields_print_as_the_kernel_formats_them(name: str, fields: dict, text: str) -> None:
    assert format_event(name, fields) == text


def test_kvm_exit_names_the_reason_of_its_isa() -> None:
    """kvm_print_exit_reason: VMX reasons in upper case, SVM exit codes by their short names."""
    vmx = format_event("kvm_exit", {"vcpu_id": 0, "exit_reason": 49, "isa": 1, "rip": 0x1000})
    svm = format_event("kvm_exit", {"vcpu_id": 0, "exit_reason": 0x400, "isa": 2, "rip": 0x1000, "info1": 0x10000000d})
    assert vmx == ("vcpu 0 reason EPT_MISCONFIG rip 0x1000 info1 0x0000000000000000 info2 0x0000000000000000 "
                   "intr_info 0x00000000 error_code 0x00000000")
    assert svm.startswith("vcpu 0 reason npf rip 0x1000 info1 0x000000010000000d ")


def test_the_role_word_is_decoded_as_kvm_mmu_page_printk() -> None:
    """KVM_MMU_PAGE_PRINTK: level, gpte size, quadrant, direct, access string, nxe / ad, root count."""
    role = 4 | (7 << 8) | (1 << 12)                  # level 4, 8-byte gptes, wux, efer_nx
    assert format_event("kvm_mmu_get_page", {"mmu_valid_gen": 1, "gfn": 0x14F, "role": role, "root_count": 2,
                                             "unsync": False, "created": True}) == \
        "sp gen 1 gfn 14f l4 8-byte q0 wux nxe ad root 2 sync new"
    role = 1 | (1 << 4) | (1 << 5) | (1 << 7) | (6 << 8) | (1 << 16)   # 4-byte gptes, q1, direct, wu-, !nxe, !ad
    assert format_event("kvm_mmu_sync_page", {"gfn": 0x20, "role": role, "unsync": True}) == \
        "sp gen 0 gfn 20 l1 4-byte q1 direct wu- !nxe !ad root 0 unsync"


def test_selections_follow_trace_cmd() -> None:
    """-e SUBSYSTEM, -e SYSTEM:GLOB, -e NAME; the default is every kvm and kvmmmu event."""
    default = select_events(None)
    assert "kvm_exit" in default and "mark_mmio_spte" in default
    assert all(subsystem(n) in ("kvm", "kvmmmu") for n in default)
    assert select_events(["kvmmmu:*mmio*"]) == {"mark_mmio_spte", "handle_mmio_page_fault", "check_mmio_spte"}
    assert select_events(["kvm_exit", "kvm_entry"]) == {"kvm_exit", "kvm_entry"}
    assert "memslot_update" in select_events(["kvmmu"])


@pytest.mark.parametrize("bad", ["bogus", "kvm:nothing_like_this", "", "kvmmm"])
def test_an_unknown_event_is_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        select_events([bad])
    assert repr(bad) in str(e.value)


# -- the events a VM emits ---------------------------------------------------------------------------
def _guest(mmu: str, **kw: object) -> tuple[kvmmu.VM, kvmmu.Vcpu, list]:
    vm = kvmmu.VM(mmu=mmu, **kw)
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=64 << 20)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=0x100000)
    pt.map(MMIO_GVA, MMIO_GPA)                        # P|RW|US, the default flags
    v = vm.create_vcpu()
    v.set_sregs(cr0=CR0, cr3=pt.cr3, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
    vm.mmio_handler = lambda exit_: 0
    events: list = []
    vm.trace.subscribe(events.append)
    return vm, v, events


def _between_exit_and_entry(events: list) -> list[list[str]]:
    runs, cur = [], None
    for ev in events:
        if ev.name == "kvm_exit":
            cur = [f"kvm_exit:{format_event(ev.name, ev.fields).split()[3]}"]
        elif cur is not None:
            cur.append(ev.name)
            if ev.name == "kvm_entry":
                runs.append(cur)
                cur = None
    return runs


def test_ept_misconfiguration_is_not_a_kvm_page_fault() -> None:
    """handle_ept_misconfig calls kvm_mmu_page_fault without tracing kvm_page_fault; an EPT
    violation's handler traces it (vmx.c)."""
    vm, v, events = _guest("ept")
    v.access(MMIO_GVA, 4, "read")                     # violation: the MMIO spte is created
    v.access(MMIO_GVA, 4, "read")                     # misconfiguration: the fast path
    runs = _between_exit_and_entry(events)
    misconfig = [r for r in runs if r[0] == "kvm_exit:EPT_MISCONFIG"]
    violations = [r for r in runs if r[0] == "kvm_exit:EPT_VIOLATION"]
    assert misconfig and all("kvm_page_fault" not in r for r in misconfig)
    assert violations and all(r[1] == "kvm_page_fault" for r in violations)
    assert any("kvm_userspace_exit" in r for r in misconfig)


def test_npt_faults_are_npf_exits_with_kvm_page_fault() -> None:
    """npf_interception traces kvm_page_fault for every #NPF, the RSVD (MMIO spte) ones included."""
    vm, v, events = _guest("npt")
    v.access(MMIO_GVA, 4, "read")
    v.access(MMIO_GVA, 4, "read")
    runs = _between_exit_and_entry(events)
    assert runs and all(r[0] == "kvm_exit:npf" and r[1] == "kvm_page_fault" for r in runs)
    rsvd = [ev for ev in events if ev.name == "kvm_page_fault" and ev.fields["error_code"] & 8]
    assert rsvd, "the second access's #NPF carries PFERR_RSVD"


@pytest.mark.parametrize(("mmu", "kind", "access"), [("npt", "read", 7), ("shadow", "write", 7),
                                                   ("shadow", "read", 5), ("ept", "read", 6)])
def test_mark_mmio_spte_access_includes_the_marker_bits(mmu: str, kind: str, access: int) -> None:
    """mark_mmio_spte records `spte & ACC_ALL`: on shadow / NPT the MMIO value's P bit is in it (7 for
    W|U; a shadow read of a clean PTE caches U only, protect_clean_gpte: 5), on EPT the W+X
    misconfiguration marker (6)."""
    vm, v, events = _guest(mmu)
    v.access(MMIO_GVA, 4, kind, 1 if kind == "write" else None)
    marks = [ev.fields for ev in events if ev.name == "mark_mmio_spte"]
    assert len(marks) == 1 and marks[0]["access"] == access


def test_zap_all_fast_prints_the_generation_before_it_flips() -> None:
    """kvm_mmu_zap_all_fast traces before toggling mmu_valid_gen: the first delete shows 0, the next 1."""
    vm, v, events = _guest("shadow")
    vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 32, memory_size=1 << 20)
    v.access(MMIO_GVA, 4, "read")
    vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 32, memory_size=0)
    vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 32, memory_size=1 << 20)
    vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 32, memory_size=0)
    gens = [ev.fields["mmu_valid_gen"] for ev in events if ev.name == "kvm_mmu_zap_all_fast"]
    assert gens == [0, 1]


def test_a_userspace_mmio_read_is_unsatisfied_then_read() -> None:
    """read_exit_mmio traces the unsatisfied read, KVM_RUN returns KVM_EXIT_MMIO, and the completed
    read is traced with its value when the VMM has answered."""
    vm, v, events = _guest("shadow")
    vm.mmio_handler = lambda exit_: 0xABCD
    assert v.access(MMIO_GVA, 2, "read").value == 0xABCD
    seq = [(ev.name, ev.fields.get("type")) for ev in events if ev.name in ("kvm_mmio", "kvm_userspace_exit")]
    assert seq == [("kvm_mmio", 0), ("kvm_userspace_exit", None), ("kvm_mmio", 1)]
    assert [ev.fields["val"] for ev in events if ev.name == "kvm_mmio"][-1] == 0xABCD


def test_every_exit_is_followed_by_an_entry() -> None:
    """Each kvm_exit the vCPU takes ends in a kvm_entry before the next exit (KVM resumes the guest)."""
    vm, v, events = _guest("shadow")
    for gva in (0x200000, MMIO_GVA, MMIO_GVA, 0x201000):
        v.access(gva, 4, "read")
    v.invlpg(MMIO_GVA)
    names = [ev.name for ev in events if ev.name in ("kvm_exit", "kvm_entry")]
    assert names and names == ["kvm_exit", "kvm_entry"] * (len(names) // 2)
    assert sum(1 for n in names if n == "kvm_exit") == v.stats["exits"]
