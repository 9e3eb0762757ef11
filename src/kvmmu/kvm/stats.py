"""KVM's statistics under KVM's names (the binary stats fd), plus the model's own counters.

`VCPU_STATS`/`VM_STATS` are exactly KVM's names; the model never invents a KVM-sounding name.
What KVM does not count but the 2011 discussion argued about (guest walks, memslot lookups, lockless
shadow walks, cache hits) lives in `MODEL_COUNTERS`, reported separately.
"""

from __future__ import annotations

VCPU_STATS = (
    "pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast", "pf_mmio_spte_created", "pf_guest",
    "tlb_flush", "invlpg", "exits", "io_exits", "mmio_exits", "halt_exits", "insn_emulation",
    "insn_emulation_fail", "guest_mode", "nested_run",
)
VM_STATS = (
    "remote_tlb_flush", "remote_tlb_flush_requests", "mmu_shadow_zapped", "mmu_pte_write",
    "mmu_pde_zapped", "mmu_flooded", "mmu_recycled", "mmu_cache_miss", "mmu_unsync", "pages_4k",
    "pages_2m", "pages_1g", "nx_lpage_splits", "max_mmu_rmap_size", "max_mmu_page_hash_collisions",
)
# Gauges (KVM's "instant" stats) go up and down; the rest only go up.
VM_GAUGES = ("mmu_unsync", "pages_4k", "pages_2m", "pages_1g")

MODEL_COUNTERS = (
    "guest_walks",           # software walks of the guest's page tables by KVM (fault path + emulator)
    "guest_pte_reads",       # gptes read by those walks
    "memslot_lookups",       # gfn_to_memslot calls
    "memslot_searches",      # ... that missed the vCPU's last-used-slot cache and searched
    "shadow_walks",          # lockless walks of KVM's own tables (MMIO fast path)
    "shadow_walk_steps",     # sptes read by those walks
    "mmio_cache_hits",       # the per-vCPU MMIO cache answered (fast path or emulator)
    "mmio_fastpath",         # RSVD faults resolved by handle_mmio_page_fault (EMULATE)
    "mmio_fastpath_invalid", # ... that found a stale generation and fell back
    "spte_installs",         # leaf sptes written by the fault path
    "hw_walks",              # TLB misses: the CPU walked KVM's tables
    "tlb_hits",
    "emulated_accesses",
    "userspace_exits",       # KVM_EXIT_MMIO records (one per <= 8-byte piece)
    "iobus_handled",         # accesses completed by an in-kernel device
    "fast_mmio",             # EPT misconfigurations completed by KVM_FAST_MMIO_BUS (no decode, no MMU)
    "host_swapins",          # host pages faulted back in
)


class Stats(dict):
    """A dict of counters that refuses names that are not declared (typos would hide bugs)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__((n, 0) for n in names)

    def __missing__(self, key: str) -> int:
        raise KeyError(f"no such statistic: {key!r}")

    def snapshot(self) -> dict[str, int]:
        return dict(self)


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that moved between two snapshots."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
