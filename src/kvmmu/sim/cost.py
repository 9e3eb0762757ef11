"""A modelled cost: cycles per event, summed over what a run counted.

Each parameter is charged once per occurrence of one counter (a KVM stat under KVM's name, or one of
the model's own counters).  The defaults are order-of-magnitude figures for an x86 server of the
2011-2020 generations at about 2.5 GHz, chosen from public descriptions, not measured by kvmmu.
docs/experiments.md ("The cost model") has the table of defaults and where each figure comes from:

- vm_exit 1200 per `exits`: VMX/SVM exit + entry plus KVM's dispatch ("hundreds or thousands of
  cycles", Intel 2009; kvm-unit-tests vmexit cpuid is commonly reported at ~1,000-1,500 cycles)
- guest_pte_read 60 per `guest_pte_reads`: KVM's __get_user of one gpte through the memslot's hva
- memslot_lookup 10 per lookup answered by the last-used slot; memslot_search 80 per `memslot_searches`
- shadow_walk_step 15 per `shadow_walk_steps`: one cache-hot spte read on the lockless walk
- spte_install 250, mmu_page_alloc 1000 (`mmu_cache_miss`), mmu_page_zap 800 (`mmu_shadow_zapped`)
- emulation 1500 per `insn_emulation`: fetch, decode, emulate one instruction
- iobus_device 200 per `iobus_handled`: an in-kernel device (LAPIC, IOAPIC, ioeventfd)
- userspace_exit 6000 per `userspace_exits`: KVM_EXIT_MMIO to the VMM and back (kvm-unit-tests
  inl_from_qemu is commonly reported at several thousand to ~15,000 cycles)
- guest_fault 600 per `pf_guest`; tlb_flush 400 per `tlb_flush`
- hw_walk_shadow 30 / hw_walk_tdp 90 per `hw_walks` (a TLB miss in KVM's tables / in two dimensions)
- host_swapin 250000 per `host_swapins`: ~100 us, a swap-in from an SSD (a 2011 disk: 25 M cycles)

Override any of them from a TOML or JSON file (`CostModel.from_file`, `kvmmu run --cost FILE`):

    vm_exit = 800
    host_swapin = 25000000
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from operator import itemgetter, mul
from pathlib import Path
from typing import Any

from ..errors import ScenarioError
from .textfile import read_text

MAX_COST = 10**10                  # cycles per event: 4 modelled seconds at 2.5 GHz
MAX_COST_FILE = 64 << 10

# parameter -> (where the counter lives: "stats" | "counters" | "vm", counter name)
COUNTERS: dict[str, tuple[str, str]] = {
    "vm_exit": ("stats", "exits"),
    "guest_pte_read": ("counters", "guest_pte_reads"),
    "memslot_lookup": ("counters", "memslot_lookups"),
    "memslot_search": ("counters", "memslot_searches"),
    "shadow_walk_step": ("counters", "shadow_walk_steps"),
    "spte_install": ("counters", "spte_installs"),
    "mmu_page_alloc": ("vm", "mmu_cache_miss"),
    "mmu_page_zap": ("vm", "mmu_shadow_zapped"),
    "emulation": ("stats", "insn_emulation"),
    "iobus_device": ("counters", "iobus_handled"),
    "userspace_exit": ("counters", "userspace_exits"),
    "guest_fault": ("stats", "pf_guest"),
    "tlb_flush": ("stats", "tlb_flush"),
    "hw_walk_shadow": ("counters", "hw_walks"),
    "hw_walk_tdp": ("counters", "hw_walks"),
    "host_swapin": ("counters", "host_swapins"),
}

# Report categories: what a reader wants to compare, each a sum of parameters.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "VM exits": ("vm_exit",),
    "guest page walks by KVM": ("guest_pte_read",),
    "memslot lookups": ("memslot_lookup", "memslot_search"),
    "lockless shadow walks": ("shadow_walk_step",),
    "sptes and shadow pages": ("spte_install", "mmu_page_alloc", "mmu_page_zap"),
    "instruction emulation": ("emulation",),
    "in-kernel devices": ("iobus_device",),
    "userspace (KVM_EXIT_MMIO)": ("userspace_exit",),
    "#PF injection": ("guest_fault",),
    "TLB flushes and misses": ("tlb_flush", "hw_walk_shadow", "hw_walk_tdp"),
    "host swap-ins": ("host_swapin",),
}


@dataclass(frozen=True)
class CostModel:
    vm_exit: int = 1200
    guest_pte_read: int = 60
    memslot_lookup: int = 10
    memslot_search: int = 80
    shadow_walk_step: int = 15
    spte_install: int = 250
    mmu_page_alloc: int = 1000
    mmu_page_zap: int = 800
    emulation: int = 1500
    iobus_device: int = 200
    userspace_exit: int = 6000
    guest_fault: int = 600
    tlb_flush: int = 400
    hw_walk_shadow: int = 30
    hw_walk_tdp: int = 90
    host_swapin: int = 250000

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "cost model") -> CostModel:
        known = {f.name for f in fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise ScenarioError(f"{where}: unknown cost parameter {key!r} (known: {', '.join(sorted(known))})")
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COST:
                raise ScenarioError(f"{where}: {key}={value!r}: a cost is an integer number of cycles from 0 to "
                                    f"{MAX_COST:,}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> CostModel:
        """Defaults overridden by a TOML (or .json) file of `parameter = cycles` lines."""
        p = Path(path)
        where = f"cost file {str(p)!r}"
        text = read_text(p, where, MAX_COST_FILE, f"{MAX_COST_FILE >> 10} KiB, not a table of costs",
                         "a cost file")
        fmt = "JSON" if p.suffix == ".json" else "TOML"
        try:
            data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except RecursionError:
            raise ScenarioError(f"{where}: not valid {fmt}: nested too deeply") from None
        except ValueError as e:              # JSONDecodeError, TOMLDecodeError, an integer of 5,000 digits
            raise ScenarioError(f"{where}: not valid {fmt}: {str(e)[:120]}") from None
        if not isinstance(data, dict):
            raise ScenarioError(f"cost file {str(p)!r}: expected a table of parameter = cycles")
        if "cost" in data and isinstance(data["cost"], dict) and len(data) == 1:
            data = data["cost"]
        return cls.from_mapping(data, f"cost file {str(p)!r}")

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # -- charging ---------------------------------------------------------------------------------
    def _count(self, name: str, stats: dict[str, int], counters: dict[str, int], vm_stats: dict[str, int],
               flavour: str) -> int:
        where, counter = COUNTERS[name]
        if name == "hw_walk_shadow" and flavour != "shadow" or name == "hw_walk_tdp" and flavour == "shadow":
            return 0
        src = stats if where == "stats" else counters if where == "counters" else vm_stats
        n = src.get(counter, 0)
        if name == "memslot_lookup":
            n -= counters.get("memslot_searches", 0)
        return n

    def breakdown(self, stats: dict[str, int], counters: dict[str, int], vm_stats: dict[str, int] | None = None,
                  flavour: str = "shadow") -> dict[str, int]:
        """Cycles per parameter for these counts (VM-level stats are charged when given)."""
        vm_stats = vm_stats or {}
        return {f.name: self._count(f.name, stats, counters, vm_stats, flavour) * getattr(self, f.name)
                for f in fields(self)}

    def cycles(self, stats: dict[str, int], counters: dict[str, int], vm_stats: dict[str, int] | None = None,
               flavour: str = "shadow") -> int:
        return sum(self.breakdown(stats, counters, vm_stats, flavour).values())

    def counts(self, stats: dict[str, int], counters: dict[str, int], vm_stats: dict[str, int] | None = None,
               flavour: str = "shadow") -> dict[str, int]:
        vm_stats = vm_stats or {}
        return {f.name: self._count(f.name, stats, counters, vm_stats, flavour) for f in fields(self)}

    def by_category(self, stats: dict[str, int], counters: dict[str, int], vm_stats: dict[str, int] | None = None,
                    flavour: str = "shadow") -> dict[str, tuple[int, int]]:
        """{category: (events, cycles)}."""
        b = self.breakdown(stats, counters, vm_stats, flavour)
        n = self.counts(stats, counters, vm_stats, flavour)
        return {cat: (sum(n[p] for p in params), sum(b[p] for p in params)) for cat, params in CATEGORIES.items()}

    # -- fast incremental charging for the time model --------------------------------------------------
    def vcpu_cost_fn(self, flavour: str) -> Callable[[Any], int]:
        """A function vcpu -> cycles charged so far for that vCPU's own stats and counters."""
        terms_s: list[tuple[str, int]] = []
        terms_c: list[tuple[str, int]] = []
        for f in fields(self):
            where, counter = COUNTERS[f.name]
            if where == "vm" or (f.name == "hw_walk_shadow" and flavour != "shadow") or \
                    (f.name == "hw_walk_tdp" and flavour == "shadow"):
                continue
            cost = getattr(self, f.name)
            if f.name == "memslot_lookup":
                terms_c.append(("memslot_lookups", cost))
                terms_c.append(("memslot_searches", -cost))
                continue
            (terms_s if where == "stats" else terms_c).append((counter, cost))

        # Called after every exit or walk: the same sums, with the per-term work in C (itemgetter of
        # >= 2 keys returns a tuple; a lone key is repeated with a zero cost to keep it a tuple).
        get_s, cost_s = _terms(terms_s)
        get_c, cost_c = _terms(terms_c)

        def fn(vcpu: Any) -> int:
            return sum(map(mul, get_s(vcpu.stats), cost_s)) + sum(map(mul, get_c(vcpu.counters), cost_c))
        return fn

    def vm_cost_fn(self) -> Callable[[Any], int]:
        terms = [(COUNTERS[f.name][1], getattr(self, f.name)) for f in fields(self) if COUNTERS[f.name][0] == "vm"]

        get, costs = _terms(terms)

        def fn(vm: Any) -> int:
            return sum(map(mul, get(vm.stats), costs))
        return fn


def _terms(terms: list[tuple[str, int]]) -> tuple[Callable[[Any], tuple[int, ...]], tuple[int, ...]]:
    """(a getter of the counters' values as a tuple, their costs in the same order)."""
    if not terms:
        return (lambda d: ()), ()
    if len(terms) == 1:
        terms = terms * 2
        terms[1] = (terms[1][0], 0)
    return itemgetter(*(k for k, _ in terms)), tuple(v for _, v in terms)
