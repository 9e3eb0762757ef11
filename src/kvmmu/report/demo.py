"""`make demo`: the 2011 MMIO design, side by side with no caching and with today's design."""

from __future__ import annotations

from typing import TextIO

from .experiments import METRICS, policy_matrix
from .table import format_table


def run_demo(out: TextIO, seed: int = 1, iterations: int = 2000) -> None:
    results = policy_matrix(iterations=iterations, seed=seed)
    print("kvmmu demo: a driver loop (4 RAM accesses + a doorbell write + a status read on another device page\n"
          f"per iteration, {iterations} iterations, an unrelated memslot hot-plugged halfway), per MMU flavour and\n"
          "MMIO policy.  "
          "KVM counters are vCPU/VM stats; the others are what the 2011 discussion argued about.\n", file=out)
    header = ["", *[f"{r.flavour}/{r.policy}" for r in results]]
    rows = [[label, *[r.metric(where, name) for r in results]] for label, where, name in METRICS]
    rows.append(["modelled cycles per MMIO access", *[r.cycles / r.mmio_accesses for r in results]])
    print(format_table(header, rows), file=out)
    by = {(r.flavour, r.policy): r for r in results}
    for flavour in ("shadow", "ept"):
        off, gen = by[(flavour, "off")], by[(flavour, "generation")]
        print(f"\n{flavour}: caching MMIO sptes cuts KVM's guest walks from {off.counters['guest_walks']:,} to "
              f"{gen.counters['guest_walks']:,} and memslot lookups from {off.counters['memslot_lookups']:,} to "
              f"{gen.counters['memslot_lookups']:,}; modelled cost per MMIO access "
              f"{off.cycles / off.mmio_accesses:,.0f} -> {gen.cycles / gen.mmio_accesses:,.0f} cycles.", file=out)
