"""The cost model lives at the bottom layer, `kvmmu.sim.cost` (the guest OS's time model charges it);
this name is kept for callers and cost files documented as `report.cost`."""

from ..sim.cost import CATEGORIES, COUNTERS, MAX_COST, MAX_COST_FILE, CostModel

__all__ = ["CATEGORIES", "COUNTERS", "MAX_COST", "MAX_COST_FILE", "CostModel"]
