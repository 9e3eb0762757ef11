"""A modelled cost: cycles per event, summed over what a run counted.

The figures are order-of-magnitude costs on a current x86 server (a VM exit and entry is about a
thousand cycles; a trip to the userspace VMM several thousand; reading a guest PTE through a
memslot lookup a few dozen to a hundred).  They are parameters, not measurements: change them to
ask "what if".  Each is charged per occurrence of the named counter.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class CostModel:
    vm_exit: int = 1200              # exits: VM exit + entry (the hardware round trip)
    guest_pte_read: int = 60         # guest_pte_reads: copy_from_user of one gpte
    memslot_search: int = 80         # memslot_searches: a tree search for gfn -> slot
    memslot_lookup: int = 10         # memslot_lookups answered by the last-used slot
    shadow_walk_step: int = 15       # shadow_walk_steps: one spte read on the lockless walk
    spte_install: int = 250          # spte_installs (incl. rmap add, possible shadow-page work)
    emulation: int = 1500            # insn_emulation: fetch + decode + emulate one instruction
    userspace_exit: int = 6000       # userspace_exits: KVM_EXIT_MMIO round trip through the VMM
    guest_fault: int = 600           # pf_guest: injecting #PF into the guest
    host_swapin: int = 50000         # host_swapins: faulting a swapped-out host page back in

    _COUNTERS = {
        "vm_exit": ("stats", "exits"), "guest_pte_read": ("counters", "guest_pte_reads"),
        "memslot_search": ("counters", "memslot_searches"), "memslot_lookup": ("counters", "memslot_lookups"),
        "shadow_walk_step": ("counters", "shadow_walk_steps"), "spte_install": ("counters", "spte_installs"),
        "emulation": ("stats", "insn_emulation"), "userspace_exit": ("counters", "userspace_exits"),
        "guest_fault": ("stats", "pf_guest"), "host_swapin": ("counters", "host_swapins"),
    }

    def breakdown(self, stats: dict[str, int], counters: dict[str, int]) -> dict[str, int]:
        out = {}
        for f in fields(self):
            where, name = self._COUNTERS[f.name]
            n = (stats if where == "stats" else counters).get(name, 0)
            if f.name == "memslot_lookup":
                n -= counters.get("memslot_searches", 0)
            out[f.name] = n * getattr(self, f.name)
        return out

    def cycles(self, stats: dict[str, int], counters: dict[str, int]) -> int:
        return sum(self.breakdown(stats, counters).values())
