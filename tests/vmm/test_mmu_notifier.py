"""The host calls KVM only through the MMU notifiers registered with it (Linux's mmu_notifier_ops).

Linux's rules: a mapping's page is unmapped only after every registered notifier's
invalidate_range_start has run for it (swap-out, COW of the zero page), and reclaim's aging asks
clear_young, giving a page that some notifier reports young a second chance.
"""
from __future__ import annotations

import kvmmu
from kvmmu.hw.host import Host


class Recorder:
    def __init__(self, young: set[int] = frozenset()) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.young = set(young)

    def invalidate_range(self, start: int, end: int) -> bool:
        self.calls.append(("invalidate", start, end))
        return False

    def clear_young(self, start: int, end: int) -> bool:
        self.calls.append(("clear_young", start, end))
        was = start >> 12 in self.young
        self.young.discard(start >> 12)
        return was


def test_swap_out_invalidates_each_page_in_every_notifier() -> None:
    host = Host(memory_limit=1 << 30)
    a, b = Recorder(), Recorder()
    host.register_mmu_notifier(a)
    host.register_mmu_notifier(b)
    host.touch(0x100)
    host.touch(0x101)
    assert host.swap_out_pages([0x100, 0x101, 0x555]) == 2         # 0x555 was never resident
    expected = [("invalidate", 0x100000, 0x101000), ("invalidate", 0x101000, 0x102000)]
    assert a.calls == expected and b.calls == expected


def test_reclaim_gives_a_young_page_a_second_chance() -> None:
    host = Host(memory_limit=1 << 20, reserved=(1 << 20) - (3 << 12))      # room for three guest pages
    n = Recorder(young={0x10})
    host.register_mmu_notifier(n)
    for pfn in (0x10, 0x11, 0x12, 0x13):                             # the fourth is one too many
        host.touch(pfn)
    assert host.reclaim() == 1
    assert host.second_chances == 1
    # 0x10 (oldest) was young: cleared and kept; 0x11 was not: invalidated, then swapped out.
    assert n.calls[:3] == [("clear_young", 0x10000, 0x11000), ("clear_young", 0x11000, 0x12000),
                           ("invalidate", 0x11000, 0x12000)]
    assert 0x11 in host.swapped and 0x10 not in host.swapped


def test_a_vm_registers_its_notifier_and_is_called_through_it() -> None:
    host = Host(memory_limit=1 << 30)
    vm = kvmmu.VM(mmu="shadow", host=host)
    assert host.mmu_notifiers == [vm.mmu_notifier]
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=1 << 20)
    hva = vm.memslots.slot(0).userspace_addr
    # Nothing maps the page yet: the notifier drops nothing and says nothing was young.
    assert vm.mmu_notifier.invalidate_range(hva, hva + 0x1000) is False
    assert vm.mmu_notifier.clear_young(hva, hva + 0x1000) is False
