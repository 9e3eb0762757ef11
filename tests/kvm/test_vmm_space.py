"""Fresh guest RAM comes from the VMM's address space and goes back on delete (issue 15, F10)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvmmu

GiB = 1 << 30


def test_f10_1024_hotplug_cycles_of_1_gib_do_not_exhaust_the_address_space() -> None:
    """The report: after 1,024 create/delete cycles of a 1 GiB slot without userspace_addr every new
    slot was refused.  munmap returns the range, so cycle 2,000 still succeeds."""
    vm = kvmmu.VM()
    for _ in range(2000):
        vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 36, memory_size=GiB)
        vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 36, memory_size=0)
    vm.set_user_memory_region(slot=1, guest_phys_addr=1 << 36, memory_size=GiB)


def test_exhaustion_names_memory_size_not_an_address_the_caller_never_passed() -> None:
    """A VMM address space that cannot hold the fresh mapping: the refusal names the size asked for."""
    vm = kvmmu.VM()
    size = vm._vmm_space.end - vm._vmm_space.start
    vm.set_user_memory_region(slot=1, guest_phys_addr=0, memory_size=size - (1 << 20))
    with pytest.raises(kvmmu.MemslotError) as exc:
        vm.set_user_memory_region(slot=2, guest_phys_addr=1 << 45, memory_size=2 << 20)
    assert "memory_size" in str(exc.value) and "userspace_addr" not in str(exc.value)
    assert vm.memslots.slot(2) is None


def test_a_remapped_range_reads_zeros() -> None:
    """A fresh mapping is fresh: the deleted slot's data does not show through the next one."""
    vm = kvmmu.VM()
    vm.set_user_memory_region(slot=1, guest_phys_addr=0, memory_size=1 << 20)
    hva = vm.memslots.slot(1).userspace_addr
    vm.write_phys(0x1000, b"secret")
    vm.set_user_memory_region(slot=1, guest_phys_addr=0, memory_size=0)
    vm.set_user_memory_region(slot=2, guest_phys_addr=0, memory_size=1 << 20)
    assert vm.memslots.slot(2).userspace_addr == hva
    assert vm.read_phys(0x1000, 6) == bytes(6)


def test_an_alias_keeps_a_deleted_slots_memory_mapped() -> None:
    """A slot given an address inside another slot's fresh memory keeps it: no fresh mapping is placed
    over it, and its contents stay."""
    vm = kvmmu.VM()
    vm.set_user_memory_region(slot=1, guest_phys_addr=0, memory_size=1 << 20)
    hva = vm.memslots.slot(1).userspace_addr
    vm.set_user_memory_region(slot=2, guest_phys_addr=1 << 30, memory_size=1 << 20, userspace_addr=hva)
    vm.write_phys(0x3000, b"kept")
    vm.set_user_memory_region(slot=1, guest_phys_addr=0, memory_size=0)
    vm.set_user_memory_region(slot=3, guest_phys_addr=0, memory_size=1 << 20)
    assert vm.memslots.slot(3).userspace_addr >= hva + (1 << 20)
    assert vm.read_phys((1 << 30) + 0x3000, 4) == b"kept"


def test_a_slot_recreated_on_its_old_address_finds_its_contents() -> None:
    """Deleting a slot does not unmap its memory until the range is mapped afresh: the VMM re-creating
    it on the same userspace_addr (a memory region toggled off and on) sees its data."""
    vm = kvmmu.VM()
    vm.set_user_memory_region(slot=1, guest_phys_addr=0, memory_size=1 << 20)
    hva = vm.memslots.slot(1).userspace_addr
    vm.write_phys(0x2000, b"data")
    vm.set_user_memory_region(slot=1, guest_phys_addr=0, memory_size=0)
    vm.set_user_memory_region(slot=1, guest_phys_addr=0, memory_size=1 << 20, userspace_addr=hva)
    assert vm.read_phys(0x2000, 4) == b"data"


@settings(max_examples=50, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 3)), min_size=1, max_size=40))
def test_fresh_mappings_never_overlap(ops: list[tuple[int, int]]) -> None:
    """Property: any create/delete sequence of fresh slots (sizes 4 KiB - 1 GiB) leaves live slots'
    host ranges disjoint, and each slot's memory is its own (a marker written to each reads back)."""
    vm = kvmmu.VM()
    for sid, size_sel in ops:
        gpa = sid << 32
        if vm.memslots.slot(sid) is None:
            size = (0x1000, 1 << 21, 3 << 20, GiB)[size_sel]
            vm.set_user_memory_region(slot=sid, guest_phys_addr=gpa, memory_size=size)
            vm.write_phys(gpa, sid.to_bytes(8, "little"))
        else:
            vm.set_user_memory_region(slot=sid, guest_phys_addr=gpa, memory_size=0)
        live = sorted((s.userspace_addr, s.userspace_addr + (s.npages << 12)) for s in vm.memslots.all_slots())
        assert all(a[1] <= b[0] for a, b in zip(live, live[1:], strict=False))
        for s in vm.memslots.all_slots():
            assert vm.read_phys(s.base_gfn << 12, 8) == s.id.to_bytes(8, "little")
