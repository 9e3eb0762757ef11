"""The x86 architectural bits (CR0, CR4, EFER, RFLAGS, PFERR_*, page-table entry bits) under a short
name: `from kvmmu.bits import X86_CR0_PG`.  They live in kvmmu.arch.bits, the bottom layer."""

from .arch import bits as _bits
from .arch.bits import *  # noqa: F403  (every public name of arch.bits, no more)

__all__ = [n for n in dir(_bits) if n.isupper()]
