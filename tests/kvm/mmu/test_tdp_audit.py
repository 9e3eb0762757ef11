"""vm.audit() checks the TDP MMU's roots and sptes: each corruption below is one KVM bug it must name."""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import X86_CR0_PE


def _vm() -> tuple[kvmmu.VM, kvmmu.Vcpu, int, int]:
    vm = kvmmu.VM(mmu="npt")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=16 << 20)
    vm.set_user_memory_region(slot=1, guest_phys_addr=32 << 20, memory_size=1 << 20, flags=kvmmu.KVM_MEM_READONLY)
    vm.mmio_handler = lambda e: 0
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr0=X86_CR0_PE)
    for gpa in (0x100000, 0x101000, 32 << 20, 0xD0000000):
        vcpu.access(gpa, 4, "read")
    vm.audit()
    level, _ = vm.mmu.tdp_mmu.get_walk(vcpu.mmu, 0x100000)[-1]
    assert level == 1
    return vm, vcpu, _leaf_sptep(vm, vcpu, 0x100000), _leaf_sptep(vm, vcpu, 32 << 20)


def _leaf_sptep(vm: kvmmu.VM, vcpu: kvmmu.Vcpu, gpa: int) -> int:
    return list(vcpu.mmu.shadow_walk_ptrs(gpa))[-1][1]


def _corrupt(vm: kvmmu.VM, sptep: int, fn) -> None:  # noqa: ANN001
    vm.host.mem.write(sptep, 8, fn(vm.host.mem.read(sptep, 8)))


@pytest.mark.parametrize("what,match", [
    ("wrong frame", "not gfn"),
    ("ro writable", "read-only slot"),
    ("stat", "pages_4k says"),
    ("leak", "not reachable"),
    ("mmio current gen over a slot", "covers gfn"),
    ("parent", "lacks the parent pointer"),
])
def test_audit_names_the_broken_rule(what: str, match: str) -> None:
    vm, vcpu, ram, ro = _vm()
    if what == "wrong frame":
        _corrupt(vm, ram, lambda s: s ^ (1 << 12))
    elif what == "ro writable":
        _corrupt(vm, ro, lambda s: s | 2)
    elif what == "stat":
        vm.stats["pages_4k"] += 1
    elif what == "leak":
        pml4e = list(vcpu.mmu.shadow_walk_ptrs(0x100000))[0][1]
        _corrupt(vm, pml4e, lambda s: 1 << 63)       # unlink the first 512 GiB's tables without freeing them
        vm.stats["pages_4k"] -= 3
    elif what == "parent":
        _, pde = list(vcpu.mmu.shadow_walk_ptrs(0x100000))[-2]
        vm.mmu.pages_by_pfn[(vm.host.mem.read(pde, 8) >> 12) & ((1 << 40) - 1)].parent_ptes.discard(pde)
    else:
        mmio = _leaf_sptep(vm, vcpu, 0xD0000000)
        vm.set_user_memory_region(slot=2, guest_phys_addr=0xD0000000, memory_size=1 << 20)
        gen = vm.memslots.generation(0)
        _corrupt(vm, mmio, lambda s: (s & ~vm.mmu.masks.gen.spte_mask) | vm.mmu.masks.gen.encode(gen))
    with pytest.raises(kvmmu.AuditError, match=match):
        vm.audit()
