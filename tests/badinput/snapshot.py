"""A small VM that has run, and a deep snapshot of everything a rejected call must leave alone.

The snapshot is taken from the outside where the API allows it (memslots, generations, KVM's stats,
vCPU registers) and from the MMU's own structures for what has no public view (shadow pages and
their contents, rmaps, TLBs, the MMIO cache), because "nothing half-applied" is about exactly those.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

import kvmmu
from kvmmu.arch.bits import EFER_LME, EFER_NX, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE
from kvmmu.guest.pagetables import RW, GuestPageTables, P, vm_writer

LONG_MODE = dict(cr0=X86_CR0_PG | X86_CR0_PE | X86_CR0_WP, cr4=X86_CR4_PAE, efer=EFER_LME | EFER_NX)
RAM = 4 << 20
MMIO_GVA, MMIO_GPA = 0x50_0000, 0xD000_0000


def running_vm(mmu: str = "shadow", **kw: object) -> tuple[kvmmu.VM, kvmmu.Vcpu, GuestPageTables]:
    """Slot 0 = RAM [0, 4 MiB), slot 1 = 64 KiB read-only at 32 MiB; a vCPU in long mode that has
    read and written RAM and read MMIO, so shadow pages, rmaps, TLB entries, MMIO sptes exist."""
    vm = kvmmu.VM(mmu=mmu, **kw)  # type: ignore[arg-type]
    vm.set_user_memory_region(0, 0, RAM)
    vm.set_user_memory_region(1, 32 << 20, 0x10000, flags=kvmmu.KVM_MEM_READONLY)
    pt = GuestPageTables("4level", *vm_writer(vm), pool=0x10_0000, pool_end=0x18_0000)
    pt.map_range(0x40_0000 - 0x4000, 0x20_0000, 0x4000, P | RW)
    pt.map(MMIO_GVA, MMIO_GPA, flags=P | RW)
    pt.map(0x60_0000, 32 << 20, flags=P | RW)
    vm.mmio_handler = lambda exit_: 0x1234
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr3=pt.cr3, **LONG_MODE)
    for i in range(4):
        vcpu.access(0x40_0000 - 0x4000 + 0x1000 * i, 8, "write", i)
    vcpu.access(MMIO_GVA, 4, "read")
    vcpu.access(0x60_0000, 4, "read")
    return vm, vcpu, pt


def vcpu_state(v: kvmmu.Vcpu) -> dict[str, object]:
    return {
        "regs": (v.cr0, v.cr3, v.cr4, v.efer, v.cpl, v.rflags, v.pkru, v.cr2),
        "pdptrs": tuple(v.mmu.pdptrs),
        "root": (v.mmu.root_hpa, v.mmu.root_role, tuple((p, sp.hpa) for p, sp in v.mmu.prev_roots)),
        "tlb": dict(v.cpu.tlb),
        "gpa_cache": dict(getattr(v.cpu, "gpa_cache", {})),
        "mmio_cache": (v.mmio_gva, v.mmio_gfn, v.mmio_access, v.mmio_gen),
        "stats": dict(v.stats.snapshot()),
        "requests": frozenset(v.requests),
        "pending": v.pending_exception,
    }


def vm_state(vm: kvmmu.VM, guest_memory: bool = True) -> dict[str, object]:
    ms = vm.memslots
    mem = vm.host.mem
    pages = []
    for sp in vm.mmu.active_mmu_pages:
        content = hashlib.sha1(mem.read_bytes(sp.hpa, 0x1000)).hexdigest()
        pages.append((sp.gfn, sp.role, sp.hpa, sp.unsync, frozenset(sp.unsync_children), frozenset(sp.parent_ptes),
                      sp.root_count, content))
    out: dict[str, object] = {
        "slots": sorted((s.id, s.as_id, s.base_gfn, s.npages, s.userspace_addr, s.flags, frozenset(s.dirty_bitmap))
                        for s in ms.all_slots()),
        "generations": tuple(ms.generation(i) for i in range(ms.nr_as)),
        "stats": dict(vm.stats.snapshot()),
        "shadow_pages": sorted(pages),
        "n_used_mmu_pages": vm.mmu.n_used_mmu_pages,
        "mmu_valid_gen": vm.mmu.mmu_valid_gen,
        "rmap": {k: frozenset(v) for k, v in vm.mmu.rmap.items()},
        "write_track": dict(vm.mmu.write_track),
        "vcpus": [vcpu_state(v) for v in vm.vcpus],
        "host_kernel_pages": vm.host.kernel_pages_in_use,
    }
    if guest_memory:
        out["ram"] = hashlib.sha1(vm.read_phys(0, RAM)).hexdigest()
    return out


def assert_unchanged(before: dict[str, object], after: dict[str, object], what: str) -> None:
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"the rejected {what} changed {changed}: " + "; ".join(
        f"{k}: {before[k]!r} -> {after[k]!r}"[:300] for k in changed)


# The parameters whose values are addresses, registers or bit masks (docs/cli.md, "Errors"):
# an error shows them in hex; every other integer (counts, sizes in MiB, levels, slots) in decimal.
HEX_PARAMETERS = {"gva", "gpa", "guest_phys_addr", "userspace_addr", "memory_size", "address", "addr", "flags",
                  "cr0", "cr3", "cr4", "efer", "eptp", "pkru", "value", "data", "pool", "pool_end", "pte_in",
                  "page", "pfn", "Map.gpa", "Map.flags", "io.addr", "page-table", "pdpte", "rflags", "rip", "rsp",
                  "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", *(f"r{n}" for n in range(8, 16))}


def shown(what: str, value: object) -> str:
    """How kvmmu.InvalidArgument shows a value of parameter `what` in its message."""
    if isinstance(value, int) and not isinstance(value, bool):
        return hex(value) if what in HEX_PARAMETERS else str(value)
    return repr(value)


def assert_names(err: kvmmu.InvalidArgument, what: str, value: object) -> None:
    """The message names the parameter, its bad value and a rule."""
    msg = str(err)
    assert err.what == what, f"the error names {err.what!r}, not the bad parameter {what!r}: {msg}"
    assert shown(what, value) in msg, f"the message does not show the bad value {shown(what, value)}: {msg}"
    assert err.rule and err.rule in msg, f"the message states no rule: {msg}"


def assert_refused(vm: kvmmu.VM, op: Callable[[], object], what: str, value: object, label: str,
                   match: str | None = None) -> None:
    """`op` raises InvalidArgument naming `what` and its bad `value` (and `match`, if given), and
    leaves the VM exactly as it was."""
    before = vm_state(vm)
    with pytest.raises(kvmmu.InvalidArgument, match=match) as info:
        op()
    assert_names(info.value, what, value)
    assert_unchanged(before, vm_state(vm), label)
