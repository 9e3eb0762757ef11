"""Memslots under shadow paging: delete / move / flags changes, read-only slots, dirty logging and the
validation of KVM_SET_USER_MEMORY_REGION.

Spec: §2.7 (generation protocol; DELETE and MOVE swap twice and zap every shadow page, CREATE and
FLAGS_ONLY swap once and zap nothing), §3.8 / §5.6 (read-only slots), §3.13 (validation), §4.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from tests.kvm.harness import (
    DATA,
    PAGE,
    RWU,
    SPTE_MMU_PRESENT,
    WARM,
    Guest,
    MiB,
    assert_pf,
    is_shadow_mmio_spte,
)

SLOT1_GPA = 64 * MiB
SLOT1_SIZE = 1 * MiB
NR_AS = 2


def _with_slot1(g: Guest, flags: int = 0, pages: int = 8) -> None:
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=SLOT1_SIZE, flags=flags)
    for i in range(pages):
        g.pt.map(DATA + i * PAGE, SLOT1_GPA + i * PAGE)


# -- DELETE / MOVE / FLAGS_ONLY / CREATE ----------------------------------------------------------------------
def test_delete_zaps_every_shadow_page(guest: Guest) -> None:
    """§2.7: DELETE calls kvm_arch_flush_shadow_memslot, by default kvm_mmu_zap_all_fast: every shadow
    page is dropped (mmu_shadow_zapped grows by at least the number of pages) and no leaf remains."""
    g = guest
    _with_slot1(g)
    g.vcpu.access(DATA, 8, "read")
    before = g.shadow_pages()
    assert g.vm.stats["pages_4k"] >= 2
    s = g.snap()
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=0)
    d = s.delta()
    assert d.vm["mmu_shadow_zapped"] >= len(before)
    assert g.vm.stats["pages_4k"] == 0
    assert not set(g.shadow_pages()) & set(before), "a shadow page survived the zap"
    g.vcpu.access(WARM, 8, "read")           # the vCPU re-enters (and handles the pending TLB flush)
    g.audit()


def test_audit_is_clean_right_after_delete(guest: Guest) -> None:
    """§2.7: when KVM_SET_USER_MEMORY_REGION(DELETE) returns, the zap and its remote TLB flush are done
    (kvm_flush_remote_tlbs waits for every vCPU), so no vCPU can reach the deleted memory: the audit
    must be clean before any vCPU runs again."""
    g = guest
    _with_slot1(g)
    g.vcpu.access(DATA, 8, "read")
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=0)
    g.audit()


def test_delete_swaps_generation_twice(guest: Guest) -> None:
    """§2.7: DELETE first installs an INVALID copy (swap #1) and then removes the slot (swap #2); each
    swap advances the generation by the number of address spaces."""
    g = guest
    _with_slot1(g)
    gen = g.vm.memslots.generation(0)
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=0)
    assert g.vm.memslots.generation(0) == gen + 2 * NR_AS
    g.audit()


def test_deleted_range_becomes_mmio(guest: Guest) -> None:
    """§3.8: after DELETE the gfn has no slot, so the next access is MMIO: the full path installs an MMIO
    spte (pf_taken+1, pf_mmio_spte_created+1, pf_emulate+1) and the access exits to the VMM."""
    g = guest
    _with_slot1(g)
    g.vcpu.access(DATA + 0x18, 8, "read")
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=0)
    s = g.snap()
    r = g.vcpu.access(DATA + 0x18, 8, "read")
    assert [(e.phys_addr, e.len, e.is_write) for e in r.mmio_exit_records] == [(SLOT1_GPA + 0x18, 8, False)]
    assert_pf(s.delta(), pf_taken=1, pf_mmio_spte_created=1, pf_emulate=1, mmio_exits=1)
    g.audit()


def test_other_slots_survive_delete(guest: Guest) -> None:
    """DELETE of slot 1 does not touch slot 0's memory: after the zap, a slot-0 page faults in again
    (pf_fixed+1) with its contents intact."""
    g = guest
    _with_slot1(g)
    g.pt.map(DATA + 0x20_0000, 0x60_0000)
    g.vm.write_phys(0x60_0000, b"slot0ram")
    g.vcpu.access(DATA + 0x20_0000, 8, "read")
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=0)
    s = g.snap()
    r = g.vcpu.access(DATA + 0x20_0000, 8, "read")
    assert r.value == int.from_bytes(b"slot0ram", "little") and r.mmio_exit_records == []
    assert_pf(s.delta(), pf_taken=1, pf_fixed=1)
    g.audit()


def test_move_zaps_and_swaps_twice(guest: Guest) -> None:
    """§2.7 / §3.13: the same slot id with a new guest_phys_addr is a MOVE: two swaps and a zap of every
    shadow page; the old range becomes MMIO and the new one shows the same memory."""
    g = guest
    _with_slot1(g)
    g.vm.write_phys(SLOT1_GPA, b"movedram")
    g.vcpu.access(DATA, 8, "read")
    gen = g.vm.memslots.generation(0)
    s = g.snap()
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=96 * MiB, memory_size=SLOT1_SIZE)
    assert g.vm.memslots.generation(0) == gen + 2 * NR_AS
    assert s.delta().vm["mmu_shadow_zapped"] > 0
    assert g.vm.stats["pages_4k"] == 0
    assert g.vcpu.access(DATA, 8, "read").mmio_exit_records[0].phys_addr == SLOT1_GPA
    g.pt.map(DATA + 0x20_0000, 96 * MiB)
    assert g.vcpu.access(DATA + 0x20_0000, 8, "read").value == int.from_bytes(b"movedram", "little")
    g.audit()


def test_flags_only_change_swaps_once_and_zaps_nothing(guest: Guest) -> None:
    """§2.7: FLAGS_ONLY (here: enabling dirty logging) swaps once and does not zap shadow pages."""
    g = guest
    _with_slot1(g)
    g.vcpu.access(DATA, 8, "read")
    gen = g.vm.memslots.generation(0)
    s = g.snap()
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=SLOT1_SIZE,
                                flags=KVM_MEM_LOG_DIRTY_PAGES)
    assert g.vm.memslots.generation(0) == gen + NR_AS
    assert s.delta().vm["mmu_shadow_zapped"] == 0
    g.audit()


def test_create_swaps_once_and_zaps_nothing(guest: Guest) -> None:
    """§2.7: "CREATE never zaps": one swap (generation += nr_as), mmu_shadow_zapped unchanged, and
    existing mappings keep working without a fault."""
    g = guest
    g.pt.map(DATA, DATA)
    g.vcpu.access(DATA, 8, "read")
    gen = g.vm.memslots.generation(0)
    s = g.snap()
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=SLOT1_SIZE)
    g.vcpu.access(DATA, 8, "read")
    d = s.delta()
    assert g.vm.memslots.generation(0) == gen + NR_AS
    assert d.vm["mmu_shadow_zapped"] == 0
    assert_pf(d)
    g.audit()


def test_unchanged_region_is_a_no_op(guest: Guest) -> None:
    """§3.13: setting an existing slot to exactly what it is changes nothing (no generation bump)."""
    g = guest
    gen = g.vm.memslots.generation(0)
    g.vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=32 * MiB, flags=0)
    assert g.vm.memslots.generation(0) == gen
    g.audit()


# -- read-only slots (Appendix A row 6 is in test_appendix_a.py) ----------------------------------------------
def _ro_guest(g: Guest) -> None:
    _with_slot1(g, flags=KVM_MEM_READONLY)
    g.vm.write_phys(SLOT1_GPA, b"ROMBYTES")


def test_readonly_slot_read_maps_read_only(guest: Guest) -> None:
    """§5.6 / §2.4.1: reads of a read-only slot map the page (pf_fixed+1, pages_4k+1) with an spte that
    is neither writable nor host-writable (the 0/0/0 combination)."""
    g = guest
    _ro_guest(g)
    s = g.snap()
    r = g.vcpu.access(DATA, 8, "read")
    d = s.delta()
    assert r.value == int.from_bytes(b"ROMBYTES", "little") and r.mmio_exit_records == []
    assert_pf(d, pf_taken=1, pf_fixed=1)
    assert d.vm["pages_4k"] == 1
    level, spte = g.leaf_spte(DATA)
    assert level == 1 and spte & SPTE_MMU_PRESENT
    assert not spte & (1 << 1), "W set on a read-only slot's spte"
    assert not spte & (1 << 9), "Host-writable set on a read-only slot's spte"
    g.audit()


def test_readonly_slot_write_exits_with_data_and_leaves_memory(guest: Guest) -> None:
    """§5.6 / §3.8: a write to a read-only slot is RO_FAULT -> EMULATE (pf_emulate+1) without an MMIO spte
    or MMIO cache entry; the emulator's RAM write fails, so it is a KVM_EXIT_MMIO write carrying the
    data; guest memory is unchanged."""
    g = guest
    _ro_guest(g)
    s = g.snap()
    r = g.vcpu.access(DATA + 4, 4, "write", 0xDEADBEEF)
    d = s.delta()
    assert r.fault is None
    assert [(e.phys_addr, e.len, e.is_write, e.data) for e in r.mmio_exit_records] == \
        [(SLOT1_GPA + 4, 4, True, (0xDEADBEEF).to_bytes(4, "little"))]
    assert_pf(d, pf_taken=1, pf_emulate=1, mmio_exits=1)
    assert g.vm.read_phys(SLOT1_GPA, 8) == b"ROMBYTES"
    assert (g.vcpu.mmio_gva, g.vcpu.mmio_gfn) == (0, 0)
    assert not is_shadow_mmio_spte(g.leaf_spte(DATA)[1])
    g.audit()


def test_readonly_slot_write_after_read_exits(guest: Guest) -> None:
    """§5.6: a write to an already read-mapped ROM page exits as an MMIO write; reads keep being RAM."""
    g = guest
    _ro_guest(g)
    g.vcpu.access(DATA, 8, "read")
    s = g.snap()
    r = g.vcpu.access(DATA, 2, "write", 0x4141)
    assert [(e.phys_addr, e.len, e.is_write) for e in r.mmio_exit_records] == [(SLOT1_GPA, 2, True)]
    assert_pf(s.delta(), pf_taken=1, pf_emulate=1, mmio_exits=1)
    s = g.snap()
    r = g.vcpu.access(DATA, 8, "read")
    assert r.value == int.from_bytes(b"ROMBYTES", "little") and r.mmio_exit_records == []
    assert_pf(s.delta(), mmio_exits=0)
    g.audit()


# -- dirty logging -----------------------------------------------------------------------------------------
def test_dirty_log_reports_written_pages_only(guest: Guest) -> None:
    """KVM_GET_DIRTY_LOG: pages the guest wrote are reported (as slot-relative page indexes); pages it
    only read are not."""
    g = guest
    _with_slot1(g, flags=KVM_MEM_LOG_DIRTY_PAGES)
    g.vcpu.access(DATA + 3 * PAGE, 4, "write", 1)
    g.vcpu.access(DATA + 5 * PAGE, 4, "read")
    g.vcpu.access(DATA + 6 * PAGE + 8, 8, "write", 2)
    assert g.vm.get_dirty_log(1) == {3, 6}
    g.audit()


def test_dirty_log_is_cleared_by_reading_it(guest: Guest) -> None:
    """KVM_GET_DIRTY_LOG returns and clears: a second call without new writes reports nothing."""
    g = guest
    _with_slot1(g, flags=KVM_MEM_LOG_DIRTY_PAGES)
    g.vcpu.access(DATA + 3 * PAGE, 4, "write", 1)
    g.vm.get_dirty_log(1)
    assert g.vm.get_dirty_log(1) == set()
    g.audit()


def test_dirty_log_rearms_write_protection(guest: Guest) -> None:
    """§2.4.1 (1/1/0: write-protected for dirty logging): after the log is read the page's spte is
    write-protected again, so the next write faults (pf_taken+1, pf_fixed+1 under shadow paging, which
    has no fast_page_fault) and is logged again."""
    g = guest
    _with_slot1(g, flags=KVM_MEM_LOG_DIRTY_PAGES)
    g.vcpu.access(DATA + 3 * PAGE, 4, "write", 1)
    g.vm.get_dirty_log(1)
    s = g.snap()
    g.vcpu.access(DATA + 3 * PAGE, 4, "write", 2)
    assert_pf(s.delta(), pf_taken=1, pf_fixed=1)
    assert g.vm.get_dirty_log(1) == {3}
    g.audit()


def test_enabling_dirty_log_write_protects_mapped_pages(guest: Guest) -> None:
    """FLAGS_ONLY to LOG_DIRTY_PAGES: pages already mapped writable must be write-protected so that the
    next write is seen and logged."""
    g = guest
    _with_slot1(g)
    g.vcpu.access(DATA + 2 * PAGE, 4, "write", 1)
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=SLOT1_SIZE,
                                flags=KVM_MEM_LOG_DIRTY_PAGES)
    g.vcpu.access(DATA + 2 * PAGE, 4, "write", 2)
    assert g.vm.get_dirty_log(1) == {2}
    g.audit()


# -- validation (§3.13): each refusal leaves the VM exactly as it was ---------------------------------------
def _vm_state(g: Guest) -> tuple:
    ms = g.vm.memslots
    slots = sorted((s.as_id, s.id, s.base_gfn, s.npages, s.flags, s.userspace_addr) for s in ms.all_slots())
    return tuple(ms.generation(i) for i in range(ms.nr_as)), slots, dict(g.vm.stats)


BAD_REGIONS = {
    "overlaps slot 0": (dict(slot=1, guest_phys_addr=16 * MiB, memory_size=MiB), "EEXIST"),
    "overlaps slot 0 at its last page": (dict(slot=1, guest_phys_addr=32 * MiB - PAGE, memory_size=MiB), "EEXIST"),
    "unaligned guest_phys_addr": (dict(slot=1, guest_phys_addr=SLOT1_GPA + 0x800, memory_size=MiB), "EINVAL"),
    "size not a page multiple": (dict(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=0x1800), "EINVAL"),
    "unknown flag bit 3": (dict(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=MiB, flags=8), "EINVAL"),
    "GUEST_MEMFD on a VM without private memory": (
        dict(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=MiB, flags=4), "EINVAL"),
    "internal KVM_MEMSLOT_INVALID flag": (
        dict(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=MiB, flags=1 << 16), "EINVAL"),
    "slot id 32764 (KVM_USER_MEM_SLOTS)": (dict(slot=32764, guest_phys_addr=SLOT1_GPA, memory_size=MiB), "EINVAL"),
    "address space 2 (nr_as is 2)": (dict(slot=2 << 16, guest_phys_addr=SLOT1_GPA, memory_size=MiB), "EINVAL"),
    "resize of a live slot": (dict(slot=0, guest_phys_addr=0, memory_size=16 * MiB), "EINVAL"),
    "READONLY toggled on a live slot": (
        dict(slot=0, guest_phys_addr=0, memory_size=32 * MiB, flags=KVM_MEM_READONLY), "EINVAL"),
    "delete of a slot that does not exist": (dict(slot=7, guest_phys_addr=0, memory_size=0), "EINVAL"),
    "userspace_addr not page aligned": (
        dict(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=MiB, userspace_addr=0x1_0000_0800), "EINVAL"),
    "guest_phys_addr + memory_size overflows": (dict(slot=1, guest_phys_addr=(1 << 64) - PAGE, memory_size=2 * PAGE),
                                                "EINVAL"),
    "more than 2^31 - 1 pages": (dict(slot=1, guest_phys_addr=1 << 44, memory_size=1 << 43), "EINVAL"),
    "beyond kvm_mmu_max_gfn (52-bit gpa)": (dict(slot=1, guest_phys_addr=1 << 52, memory_size=MiB), "EINVAL"),
}


@pytest.mark.parametrize("region,errno", BAD_REGIONS.values(), ids=BAD_REGIONS.keys())
def test_invalid_region_is_refused_and_vm_unchanged(guest: Guest, region: dict, errno: str) -> None:
    """§3.13: KVM_SET_USER_MEMORY_REGION refuses the change with the errno the spec names (-EEXIST for
    overlaps, -EINVAL otherwise); nothing changes: generations, slots, MMU stats, mappings."""
    g = guest
    g.pt.map(DATA, DATA)
    g.vcpu.access(DATA, 8, "read")
    state = _vm_state(g)
    with pytest.raises(kvmmu.MemslotError) as exc:
        g.vm.set_user_memory_region(**region)
    assert exc.value.errno_name == errno
    assert errno in str(exc.value)
    assert _vm_state(g) == state
    s = g.snap()
    assert g.vcpu.access(DATA, 8, "read").fault is None
    assert_pf(s.delta())
    g.audit()


def test_move_onto_another_slot_is_eexist(guest: Guest) -> None:
    """§3.13: CREATE/MOVE overlapping another slot -> -EEXIST; the slot stays where it was."""
    g = guest
    _with_slot1(g)
    state = _vm_state(g)
    with pytest.raises(kvmmu.MemslotError) as exc:
        g.vm.set_user_memory_region(slot=1, guest_phys_addr=31 * MiB, memory_size=SLOT1_SIZE)
    assert exc.value.errno_name == "EEXIST"
    assert _vm_state(g) == state
    g.audit()


def test_live_slot_backing_cannot_change(guest: Guest) -> None:
    """§3.13: for an existing slot id, userspace_addr must be unchanged (-EINVAL); the VM is untouched."""
    g = guest
    uaddr = g.vm.memslots.slot(0).userspace_addr
    state = _vm_state(g)
    with pytest.raises(kvmmu.MemslotError) as exc:
        g.vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=32 * MiB, userspace_addr=uaddr + PAGE)
    assert exc.value.errno_name == "EINVAL"
    assert _vm_state(g) == state
    g.audit()


def test_readonly_and_dirty_log_flags_together_are_accepted(guest: Guest) -> None:
    """§2.7 / §3.13: LOG_DIRTY_PAGES is always allowed, READONLY on a non-guest_memfd slot: both at once
    is a valid CREATE (one swap)."""
    g = guest
    gen = g.vm.memslots.generation(0)
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=MiB,
                                flags=KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES)
    assert g.vm.memslots.generation(0) == gen + NR_AS
    g.audit()


def test_highest_user_slot_id_is_accepted(guest: Guest) -> None:
    """§3.13: user slot ids go up to KVM_USER_MEM_SLOTS - 1 = 32763."""
    g = guest
    g.vm.set_user_memory_region(slot=32763, guest_phys_addr=SLOT1_GPA, memory_size=MiB)
    assert g.vm.memslots.slot(32763) is not None
    g.audit()


def test_slot_in_smm_address_space_does_not_back_normal_accesses(guest: Guest) -> None:
    """§2.7: address space 1 (SMM) has its own memslots and generation; a vCPU outside SMM does not see
    them, so the range stays MMIO for it, and only address space 1's generation moves."""
    g = guest
    g.pt.map(DATA, SLOT1_GPA)
    gen0, gen1 = g.vm.memslots.generation(0), g.vm.memslots.generation(1)
    g.vm.set_user_memory_region(slot=(1 << 16) | 1, guest_phys_addr=SLOT1_GPA, memory_size=MiB)
    assert (g.vm.memslots.generation(0), g.vm.memslots.generation(1)) == (gen0, gen1 + NR_AS)
    r = g.vcpu.access(DATA, 8, "read")
    assert [e.phys_addr for e in r.mmio_exit_records] == [SLOT1_GPA]
    g.audit()


def test_rw_mapping_of_unbacked_slot0_page_after_shrink_by_delete_and_recreate(guest: Guest) -> None:
    """§3.13 (resizing needs DELETE then CREATE): after slot 1 is deleted and re-created with half the
    size, the upper half is MMIO and the lower half RAM."""
    g = guest
    _with_slot1(g)
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=0)
    g.vm.set_user_memory_region(slot=1, guest_phys_addr=SLOT1_GPA, memory_size=4 * PAGE)
    g.pt.map(DATA + 0x20_0000, SLOT1_GPA + 4 * PAGE, flags=RWU)
    assert g.vcpu.access(DATA, 8, "read").mmio_exit_records == []
    assert [e.phys_addr for e in g.vcpu.access(DATA + 0x20_0000, 8, "read").mmio_exit_records] == [SLOT1_GPA + 4 * PAGE]
    g.audit()


def test_generations_stay_in_their_address_space_residue(guest: Guest) -> None:
    """Invariant 5 / §2.7: address space i only ever sees generations = i (mod nr_as), the flag is set
    only inside an update (seen from during_update) and clear afterwards."""
    g = guest
    seen = []
    ops = [(1, SLOT1_GPA, MiB), ((1 << 16) | 1, SLOT1_GPA, MiB), (1, SLOT1_GPA, 0), (2, 96 * MiB, MiB),
           (2, 100 * MiB, MiB), ((1 << 16) | 1, SLOT1_GPA, 0)]
    for slot, gpa, size in ops:
        as_id = slot >> 16
        g.vm.set_user_memory_region(slot=slot, guest_phys_addr=gpa, memory_size=size,
                                    during_update=lambda a=as_id: seen.append(g.vm.memslots.generation(a)))
        for i in range(NR_AS):
            gen = g.vm.memslots.generation(i)
            assert not gen & (1 << 63) and gen % NR_AS == i, (slot, i, hex(gen))
    assert seen and all(gen & (1 << 63) for gen in seen)
    g.audit()
