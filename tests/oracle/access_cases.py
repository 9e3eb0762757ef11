"""Sets of `access_rules.Case`s: the exhaustive spaces and the seeded samples the tests run.

An exhaustive product over every flag of `access_rules` is far too large for a Python model (about
10^8 cases per mode), so the enumeration is a union of exhaustive products, each varying everything
one outcome depends on, plus seeded samples with every flag free:

* `rights_space` (full run): everything that decides fault / no fault and the error code (entry
  permission bits, P, PS, one reserved bit, PDPTE R/W, keys and PKRU, the access kind, every CPU
  control), with the A/D presets clear and no `twice`.  Entry values after the access are still
  checked exactly.
* `ad_space` (full run): everything that decides which A/D bits change (A/D presets, `twice`, the
  access kind, P, PS, R/W and U/S, CR0.WP, a reserved bit, SMEP).
* `reserved_space` (default run): every reserved-address bit that MAXPHYADDR 36, 46 or 52 makes
  reserved, with P, PS, the access kind, NXE/XD and SMEP.
* `control_space` (default run): every combination of the CPU controls with every access kind on
  present 4 KiB pages of every U/W/X (and key) shape.
* `random_cases` (both runs, different sizes): a seeded sample of the whole legal space.

In the exhaustive spaces the PTE's flags are only varied when the walk reads the PTE (the PDE is
present, valid and not a large page); otherwise the PTE is a fixed present, writable, user entry,
which a walker must not touch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from .access_rules import (
    CR0_WP,
    CR4_PKE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_NX,
    EFLAGS_AC,
    FETCH,
    IMPLICIT,
    PDE_13,
    PDE_21,
    PDE_36,
    PDE_51,
    PDE_A,
    PDE_D,
    PDE_NX,
    PDE_P,
    PDE_PSE,
    PDE_RW,
    PDE_USER,
    PDPTE_RO,
    PKEY,
    PKRU_AD,
    PKRU_WD,
    PTE_36,
    PTE_51,
    PTE_A,
    PTE_D,
    PTE_NX,
    PTE_P,
    PTE_RW,
    PTE_USER,
    RESERVED_FLAGS,
    TWICE,
    USER,
    WRITE,
    Case,
    is_legal,
    mode_flags,
    pde_is_leaf,
)

PTE_FLAGS = PTE_RW | PTE_USER | PTE_A | PTE_D | PTE_NX | PTE_P | PTE_51 | PTE_36
PTE_FIXED = PTE_P | PTE_RW | PTE_USER          # the PTE when the walk does not read it
ACCESS = USER | WRITE | FETCH | IMPLICIT
CONTROLS = EFER_NX | CR0_WP | CR4_SMEP | CR4_SMAP | EFLAGS_AC | CR4_PKE | CR4_PSE | PKRU_AD | PKRU_WD


def subsets(mask: int) -> list[int]:
    """Every subset of the bits in `mask`."""
    out = [0]
    while mask:
        bit = mask & -mask
        mask ^= bit
        out += [s | bit for s in out]
    return out


def _pte_read(case: Case) -> bool:
    """Does a walk for this case reach the PTE (PDE present, no reserved bit, not a large page)?"""
    f = case.flags
    if not f & PDE_P or pde_is_leaf(case):
        return False
    if f & (PDE_51 | PDE_36):
        return False
    return not (f & PDE_NX and not f & EFER_NX)


def product(mode: str, free: int, fixed: int = 0, *, maxphyaddr: int = 46, ad_policy: str = "kvm",
            collapse_pte: bool = True) -> Iterator[Case]:
    """Every legal case with `fixed` set and any subset of `free` (restricted to the mode's flags)."""
    allowed = mode_flags(mode, maxphyaddr)
    free &= allowed
    fixed &= allowed
    pte_part = free & PTE_FLAGS if collapse_pte else 0
    rest = free & ~pte_part
    pte_choices = subsets(pte_part)
    for r in subsets(rest):
        base = Case(mode, fixed | r, maxphyaddr, ad_policy)
        if collapse_pte and pte_part and not _pte_read(base):
            choices: list[int] = [PTE_FIXED & allowed]
        else:
            choices = pte_choices
        for p in choices:
            case = Case(mode, fixed | r | p, maxphyaddr, ad_policy)
            if is_legal(case):
                yield case


ACCESS_KINDS = tuple(a for a in subsets(ACCESS)
                     if not (a & WRITE and a & FETCH) and not (a & IMPLICIT and a & (USER | FETCH)))


def rights_space(mode: str, ad_policy: str = "kvm", access: int | None = None) -> Iterator[Case]:
    """`access` (one of ACCESS_KINDS) restricts the space to one access kind, to split the work."""
    free = (PTE_RW | PTE_USER | PTE_NX | PTE_P | PTE_51 | PTE_36
            | PDE_RW | PDE_USER | PDE_PSE | PDE_NX | PDE_P | PDE_51 | PDE_36 | PDE_13 | PDE_21
            | PDPTE_RO | PKEY | CONTROLS)
    if access is None:
        return product(mode, free | ACCESS, ad_policy=ad_policy)
    return product(mode, free, access, ad_policy=ad_policy)


def ad_space(mode: str, ad_policy: str = "kvm") -> Iterator[Case]:
    free = (PTE_A | PTE_D | PDE_A | PDE_D | TWICE | ACCESS | PTE_P | PDE_P | PDE_PSE
            | PTE_RW | PTE_USER | PDE_RW | PDE_USER | CR0_WP | CR4_SMEP | PTE_51 | PDE_51 | PDE_21)
    return product(mode, free, EFER_NX | CR4_PSE, ad_policy=ad_policy)


def reserved_space(mode: str, maxphyaddr: int, ad_policy: str = "kvm") -> Iterator[Case]:
    free = (PTE_P | PDE_P | PDE_PSE | USER | WRITE | FETCH | EFER_NX | CR4_SMEP | TWICE | PTE_NX | PDE_NX
            | PTE_51 | PTE_36 | PDE_51 | PDE_36 | PDE_13 | PDE_21)
    return product(mode, free, PTE_RW | PTE_USER | PDE_RW | PDE_USER | CR4_PSE, maxphyaddr=maxphyaddr,
                   ad_policy=ad_policy, collapse_pte=False)


def control_space(mode: str, ad_policy: str = "kvm") -> Iterator[Case]:
    """All CPU controls x all access kinds x leaf U/W/X and key on a present 4 KiB page."""
    free = CONTROLS | ACCESS | PTE_RW | PTE_USER | PTE_NX | PKEY
    return product(mode, free, PTE_P | PDE_P | PDE_RW | PDE_USER, ad_policy=ad_policy, collapse_pte=False)


def random_cases(mode: str, n: int, seed: int, ad_policy: str = "kvm",
                 maxphyaddrs: tuple[int, ...] = (36, 46, 52)) -> list[Case]:
    """`n` legal cases drawn with every flag free (at most one reserved bit, as the filter says)."""
    rng = random.Random(f"{seed}/{mode}/{ad_policy}")
    out: list[Case] = []
    while len(out) < n:
        m = rng.choice(maxphyaddrs)
        allowed = mode_flags(mode, m)
        flags = rng.getrandbits(40) & allowed & ~sum(RESERVED_FLAGS)
        if not flags & EFER_NX and rng.random() < 0.5:
            flags &= ~(PTE_NX | PDE_NX)             # XD is a reserved bit while NXE=0
        rsvd = [r for r in RESERVED_FLAGS if r & allowed]
        if rsvd and rng.random() < 0.3:
            flags |= rng.choice(rsvd)
        case = Case(mode, flags, m, ad_policy)
        if is_legal(case):
            out.append(case)
    return out
