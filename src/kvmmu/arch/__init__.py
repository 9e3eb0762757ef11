"""The x86 paging architecture as the SDM describes it: nothing here knows about KVM."""

from .modes import MODES, PagingContext, PagingMode
from .permission import permission_bitmask
from .walker import Walk, canonical, walk

__all__ = ["MODES", "PagingContext", "PagingMode", "Walk", "canonical", "permission_bitmask", "walk"]
