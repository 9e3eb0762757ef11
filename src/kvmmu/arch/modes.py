"""Paging modes as data, and the per-configuration tables the one walker runs on.

A `PagingMode` says what never changes about a mode (levels, entry size, index width, where PS may
map a page).  A `PagingContext` adds what the CPU's control registers decide (MAXPHYADDR, NXE, WP,
SMEP, SMAP, PKE, PSE, 1 GiB support, A/D policy) and precomputes, as KVM does in
`reset_guest_rsvds_bits_mask`, `update_permission_bitmask` and `update_pkru_bitmask`, the
reserved-bit masks indexed by [bit 7][level], the 16-entry permission table and the PKRU mask (the
last two from the one access rule, arch/permission.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument
from .bits import (
    BIT,
    EFER_LMA,
    EFER_LME,
    EFER_NX,
    GENMASK,
    PT32_ADDR_MASK,
    PT64_ADDR_MASK,
    X86_CR0_PG,
    X86_CR0_WP,
    X86_CR4_LA57,
    X86_CR4_PAE,
    X86_CR4_PKE,
    X86_CR4_PSE,
    X86_CR4_SMAP,
    X86_CR4_SMEP,
)
from .permission import permission_bitmask, pkru_bitmask


@dataclass(frozen=True)
class PagingMode:
    """What an SDM paging mode is, independent of any control-register setting."""

    name: str
    root_level: int          # 0 for no paging
    entry_size: int          # bytes per entry
    index_bits: int          # bits of the address consumed per level
    la_bits: int             # canonical width (48/57), 32 for 32-bit address spaces, 0 = gpa input
    large_levels: tuple[int, ...]   # levels at which PS=1 may map a page (before CR4.PSE/1G filtering)
    has_nx: bool = False
    has_pkeys: bool = False
    pae_pdptes: bool = False  # the top level is PAE's four PDPTEs (no A bit, no permissions)
    ept: bool = False

    @property
    def addr_mask(self) -> int:
        return PT32_ADDR_MASK if self.entry_size == 4 else PT64_ADDR_MASK


NONPAGING = PagingMode("nonpaging", 0, 8, 9, 32, ())
PAGING32 = PagingMode("32bit", 2, 4, 10, 32, (2,))
PAE = PagingMode("pae", 3, 8, 9, 32, (2,), has_nx=True, pae_pdptes=True)
PAGING4 = PagingMode("4level", 4, 8, 9, 48, (2, 3), has_nx=True, has_pkeys=True)
PAGING5 = PagingMode("5level", 5, 8, 9, 57, (2, 3), has_nx=True, has_pkeys=True)
EPT4 = PagingMode("ept4", 4, 8, 9, 0, (2, 3), ept=True)
EPT5 = PagingMode("ept5", 5, 8, 9, 0, (2, 3), ept=True)
# AMD nested paging: long-mode entries, but the input is a guest-physical address, so there is no
# canonical check (APM 15.25.5): a 4-level table translates gpa bits 47:0, bit 47 included.
NPT4 = PagingMode("npt4", 4, 8, 9, 0, (2, 3), has_nx=True)
NPT5 = PagingMode("npt5", 5, 8, 9, 0, (2, 3), has_nx=True)

MODES: dict[str, PagingMode] = {m.name: m for m in (NONPAGING, PAGING32, PAE, PAGING4, PAGING5, EPT4, EPT5,
                                                    NPT4, NPT5)}

AD_POLICIES = ("kvm", "hardware")

class PagingContext:
    """A paging mode under one control-register configuration, with its precomputed tables."""

    __slots__ = (
        "mode", "maxphyaddr", "nxe", "wp", "smep", "smap", "pke", "pse", "gbpages", "ad_policy",
        "ept_ad", "ept_execonly", "rsvd", "is_large", "permissions", "bad_mt_xwr", "pkeys_active",
        "pkru_mask", "id_on_fetch", "key",
    )

    def __init__(
        self,
        mode: str | PagingMode = "4level",
        *,
        maxphyaddr: int = 46,
        nxe: bool = False,
        wp: bool = False,
        smep: bool = False,
        smap: bool = False,
        pke: bool = False,
        pse: bool = False,
        gbpages: bool = True,
        ad_policy: str = "kvm",
        ept_ad: bool = False,
        ept_execonly: bool = False,
    ) -> None:
        if isinstance(mode, str):
            if mode not in MODES:
                raise InvalidArgument("mode", mode, f"a paging mode is one of {sorted(MODES)}")
            mode = MODES[mode]
        if not 32 <= maxphyaddr <= 52:
            raise InvalidArgument("maxphyaddr", maxphyaddr, "MAXPHYADDR is between 32 and 52")
        if ad_policy not in AD_POLICIES:
            raise InvalidArgument("ad_policy", ad_policy, f"the A/D policy is one of {AD_POLICIES}")
        self.mode = mode
        self.maxphyaddr = maxphyaddr
        self.nxe = bool(nxe)
        self.wp = bool(wp)
        self.smep = bool(smep)
        self.smap = bool(smap)
        self.pke = bool(pke)
        self.pse = bool(pse)
        self.gbpages = bool(gbpages)
        self.ad_policy = ad_policy
        self.ept_ad = bool(ept_ad)
        self.ept_execonly = bool(ept_execonly)
        self.rsvd = self._reserved_masks()
        large = set(mode.large_levels)
        if mode is PAGING32 and not self.pse:
            large.clear()                  # without CR4.PSE bit 7 of a PDE is ignored
        self.is_large = tuple(lvl in large for lvl in range(6))
        self.permissions = permission_bitmask(ept=mode.ept, nx=self.nxe and mode.has_nx, wp=self.wp,
                                              smep=self.smep, smap=self.smap)
        self.pkeys_active = self.pke and mode.has_pkeys
        self.pkru_mask = pkru_bitmask(pkeys=self.pkeys_active, wp=self.wp)
        # SDM: I/D is reported iff the access was a fetch and (SMEP or (PAE-style paging and NXE)).
        self.id_on_fetch = self.smep or (self.nxe and mode.has_nx)
        self.bad_mt_xwr = self._bad_mt_xwr() if mode.ept else 0
        self.key = (mode.name, maxphyaddr, self.nxe, self.wp, self.smep, self.smap, self.pke, self.pse,
                    self.gbpages, ad_policy, self.ept_ad, self.ept_execonly)

    @classmethod
    def from_regs(cls, cr0: int, cr4: int, efer: int, **kw: object) -> PagingContext:
        """The guest paging mode the SDM selects from CR0.PG, CR4.PAE, EFER.LME/LMA and CR4.LA57."""
        if not cr0 & X86_CR0_PG:
            mode = NONPAGING
        elif efer & (EFER_LMA | EFER_LME):
            if not cr4 & X86_CR4_PAE:
                raise InvalidArgument("cr4", cr4, "long mode with CR0.PG=1 requires CR4.PAE=1")
            mode = PAGING5 if cr4 & X86_CR4_LA57 else PAGING4
        elif cr4 & X86_CR4_PAE:
            mode = PAE
        else:
            mode = PAGING32
        return cls(mode, nxe=bool(efer & EFER_NX), wp=bool(cr0 & X86_CR0_WP), smep=bool(cr4 & X86_CR4_SMEP),
                   smap=bool(cr4 & X86_CR4_SMAP), pke=bool(cr4 & X86_CR4_PKE), pse=bool(cr4 & X86_CR4_PSE),
                   **kw)  # type: ignore[arg-type]

    # ----------------------------------------------------------------------------------------
    def _reserved_masks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """rsvd[bit7][level]: bits that must be zero in a present entry (SDM 4.x 'reserved bits')."""
        mode = self.mode
        r = [[0] * 6, [0] * 6]
        if mode.root_level == 0 or mode is PAGING32:
            if mode is PAGING32 and self.pse:
                # PSE-36 as KVM models it: bits 16:13 carry PA 35:32, bits 21:17 are reserved.
                r[1][2] = GENMASK(21, 17)
            return tuple(r[0]), tuple(r[1])
        if mode.ept:
            high = GENMASK(51, self.maxphyaddr)
            no1g = 0 if self.gbpages else BIT(7)
            for lvl in (4, 5):
                r[0][lvl] = r[1][lvl] = high | GENMASK(7, 3)
            r[0][3] = high | GENMASK(6, 3)
            r[0][2] = high | GENMASK(6, 3)
            r[0][1] = r[1][1] = high
            r[1][3] = high | GENMASK(29, 12) | no1g
            r[1][2] = high | GENMASK(20, 12)
            return tuple(r[0]), tuple(r[1])
        nx = 0 if self.nxe else BIT(63)
        if mode.pae_pdptes:
            high = GENMASK(62, self.maxphyaddr)
            r[0][3] = r[1][3] = BIT(63) | high | GENMASK(8, 5) | GENMASK(2, 1)
            r[0][2] = high | nx
            r[1][2] = high | nx | GENMASK(20, 13)
            r[0][1] = r[1][1] = high | nx
            return tuple(r[0]), tuple(r[1])
        high = GENMASK(51, self.maxphyaddr)
        for lvl in (4, 5):
            r[0][lvl] = r[1][lvl] = high | nx | BIT(7)
        r[0][3] = high | nx
        r[1][3] = high | nx | (GENMASK(29, 13) if self.gbpages else BIT(7))
        r[0][2] = high | nx
        r[1][2] = high | nx | GENMASK(20, 13)
        r[0][1] = r[1][1] = high | nx
        return tuple(r[0]), tuple(r[1])

    def _bad_mt_xwr(self) -> int:
        """EPT misconfiguration table indexed by entry bits 5:0 (memory type, X, W, R)."""
        bad = 0
        for low6 in range(64):
            mt, xwr = low6 >> 3, low6 & 7
            if mt in (2, 3, 7) or xwr in (0b010, 0b110) or (xwr == 0b100 and not self.ept_execonly):
                bad |= 1 << low6
        return bad

    def __repr__(self) -> str:
        flags = [n for n in ("nxe", "wp", "smep", "smap", "pke", "pse") if getattr(self, n)]
        return f"PagingContext({self.mode.name}, maxphyaddr={self.maxphyaddr}, {'|'.join(flags) or '-'})"
