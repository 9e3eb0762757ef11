"""An exception KVM or the CPU delivers to the guest, as an access reports it (`AccessResult.fault`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..arch.bits import PF_VECTOR


@dataclass(frozen=True)
class GuestFault:
    """An exception delivered to the guest: what its handler would see."""

    vector: int
    error_code: int = 0
    cr2: int | None = None

    def __repr__(self) -> str:
        if self.vector == PF_VECTOR:
            return f"#PF(error_code={self.error_code:#x}, cr2={self.cr2:#x})"
        return f"exception(vector={self.vector}, error_code={self.error_code:#x})"


__all__ = ["GuestFault"]
