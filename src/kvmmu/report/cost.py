"""The cost model's old address: it lives in `kvmmu.cost` (the bottom layer, since the guest OS
model charges cycles too); importing it from here keeps working."""

from ..cost import MAX_COST, MAX_COST_FILE, CostModel

__all__ = ["MAX_COST", "MAX_COST_FILE", "CostModel"]
