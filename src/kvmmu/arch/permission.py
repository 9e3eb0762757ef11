"""The access-rights rule of a translation, stated once: every permission check derives from it.

`access_fault` is the rule for a paging-structure translation (docs/spec/x86-access.md §5 facts
1-5, 7 and 8, from SDM Vol. 3A §4.6.1 "Determination of Access Rights", §4.6.2 "Protection Keys"
and §4.7 "Page-Fault Exceptions"); `ept_violation` is the second-stage rule of EPT (SDM Vol. 3C
§29.3.3.2: each access needs its R, W or X right), NPT being the first rule with every access a
user access (AMD APM Vol. 2 §15.25.5).

The fast paths do not evaluate the rule: like KVM (`update_permission_bitmask`,
`update_pkru_bitmask`, `permission_fault`) each `PagingContext` carries two tables computed from
it for its CR0.WP, EFER.NXE, CR4.SMEP/SMAP/PKE, and `permission_fault` reads them.  A hot loop may
inline that lookup (`permissions[permission_index(pfec, ac)] >> pte_access & 1`) but nothing else.

Encodings: an access is PFERR_* bits (W, U, F; U = CPL3, never with PFERR_IMPLICIT_ACCESS, the
model's mark of an implicit supervisor access such as a descriptor-table read); what a translation
allows is ACC_* bits (exec 1, write 2, user 4: X = not XD at every level, W and U = R/W and U/S at
every level); PKRU's two bits for the leaf's key are AD (1) and WD (2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .bits import (
    PFERR_FETCH_MASK,
    PFERR_IMPLICIT_ACCESS,
    PFERR_PK_MASK,
    PFERR_PRESENT_MASK,
    PFERR_RSVD_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
)

if TYPE_CHECKING:
    from .modes import PagingContext

# The PFEC bits that index the tables (KVM: pfec >> 1).  The RSVD position, meaningless for an
# access, carries "SMAP does not apply": EFLAGS.AC=1 on an explicit access (KVM does the same).
PERMISSION_ACCESS_BITS = PFERR_WRITE_MASK | PFERR_USER_MASK | PFERR_FETCH_MASK
PERMISSION_NOT_SMAP = PFERR_RSVD_MASK
# PKRU rights of one key.
PKRU_AD, PKRU_WD = 1, 2
_ACC_EXEC, _ACC_WRITE, _ACC_USER = 1, 2, 4


def access_fault(pfec: int, pte_access: int, *, wp: bool, nx: bool, smep: bool, smap: bool, ac: bool,
                 pkeys: bool = False, pkru_bits: int = 0) -> int:
    """The rule: 0 if the access is allowed, else the error-code bits the fault adds to the access's
    own W/U/I-D (PFERR_PRESENT_MASK, with PFERR_PK_MASK when the key forbids it).

    `nx` is EFER.NXE in a mode with XD, `pkeys` CR4.PKE in a mode with keys (4/5-level), `ac`
    EFLAGS.AC, `pkru_bits` PKRU's AD/WD for the leaf's key.  The terms, one per SDM rule (x86-access
    §5): (3) a fetch needs X when NXE is on, at any CPL; (1) a user access needs a user page;
    (2) a write needs W, except a supervisor write with CR0.WP=0; (4) SMEP: no supervisor fetch from
    a user page; (5) SMAP: no supervisor data access to a user page, unless EFLAGS.AC=1 and the
    access is explicit; (8) keys: on a data access to a user page at any CPL, AD denies it and WD
    denies a write by CPL3, or by CPL<3 with CR0.WP=1.  The key check is independent of the others
    (PK also comes with a U/S or R/W violation).
    """
    write = bool(pfec & PFERR_WRITE_MASK)
    user = bool(pfec & PFERR_USER_MASK)
    fetch = bool(pfec & PFERR_FETCH_MASK)
    implicit = bool(pfec & PFERR_IMPLICIT_ACCESS)
    user_page = bool(pte_access & _ACC_USER)
    writable = bool(pte_access & _ACC_WRITE)
    executable = bool(pte_access & _ACC_EXEC)
    if pkeys and user_page and not fetch and (
            pkru_bits & PKRU_AD or (pkru_bits & PKRU_WD and write and (user or wp))):
        return PFERR_PRESENT_MASK | PFERR_PK_MASK
    if ((fetch and nx and not executable)
            or (user and not user_page)
            or (write and not writable and (user or wp))
            or (smep and fetch and not user and user_page)
            or (smap and not fetch and not user and user_page and (implicit or not ac))):
        return PFERR_PRESENT_MASK
    return 0


def ept_violation(access: int, rights: int) -> bool:
    """EPT's rule: a write needs W (bit 1), a fetch X (bit 2), any other access R (bit 0) in the
    rights of the whole translation (the AND over every level, SDM Vol. 3C §29.3.3.2)."""
    need = (2 if access & PFERR_WRITE_MASK else 0) | (4 if access & PFERR_FETCH_MASK else 0) or 1
    return rights & need != need


# -- the tables (KVM's per-MMU precomputation), derived from the rule --------------------------
def _index_pfec(index: int) -> tuple[int, bool]:
    """The access and EFLAGS.AC a table index stands for (see PERMISSION_NOT_SMAP)."""
    pfec = index << 1
    return pfec & PERMISSION_ACCESS_BITS, bool(pfec & PERMISSION_NOT_SMAP)


def permission_bitmask(*, ept: bool, nx: bool, wp: bool, smep: bool, smap: bool) -> tuple[int, ...]:
    """KVM's `update_permission_bitmask`: for each index (PFEC >> 1, see PERMISSION_NOT_SMAP) the
    set of ACC values (bit `acc`) that fault by `access_fault`, protection keys aside."""
    table = []
    for index in range(16):
        pfec, ac = _index_pfec(index)
        bits = 0
        for acc in range(8):
            if ept:
                # KVM's EPT table keeps only the U/W/X terms (the walker checks ept_violation).
                fault = access_fault(pfec, acc, wp=True, nx=True, smep=False, smap=False, ac=ac)
            else:
                fault = access_fault(pfec, acc, wp=wp, nx=nx, smep=smep, smap=smap, ac=ac)
            if fault:
                bits |= 1 << acc
        table.append(bits)
    return tuple(table)


def pkru_bitmask(*, pkeys: bool, wp: bool) -> int:
    """KVM's `update_pkru_bitmask`: two bits (AD, WD) at offset (pfec & (W|U|F)) | (user page << 3)
    saying which of the key's PKRU bits deny that access by `access_fault`; 0 without keys."""
    mask = 0
    if not pkeys:
        return mask
    for offset in range(0, 32, 2):
        pfec = offset & PERMISSION_ACCESS_BITS
        acc = _ACC_USER if offset & PERMISSION_NOT_SMAP else 0
        for bit in (PKRU_AD, PKRU_WD):
            if access_fault(pfec, acc, wp=wp, nx=False, smep=False, smap=False, ac=True, pkeys=True,
                            pkru_bits=bit) & PFERR_PK_MASK:
                mask |= bit << offset
    return mask


def permission_index(pfec: int, ac: bool | int) -> int:
    """The table index of an access (PFERR_* bits) under EFLAGS.AC `ac`."""
    return ((pfec & PERMISSION_ACCESS_BITS)
            | (PERMISSION_NOT_SMAP if ac and not pfec & PFERR_IMPLICIT_ACCESS else 0)) >> 1


def pkru_offset(pfec: int, pte_access: int) -> int:
    """Where an access's two bits are in a `pkru_bitmask`."""
    return (pfec & PERMISSION_ACCESS_BITS) | ((pte_access & _ACC_USER) << 1)


def permission_fault(ctx: PagingContext, pfec: int, pte_access: int, ac: bool | int, pkru: int, pkey: int) -> int:
    """KVM's `permission_fault`: `access_fault` for the context through its tables.  `ac` is
    EFLAGS.AC, `pkru` the PKRU register and `pkey` the leaf's key (ignored without keys)."""
    mask = ctx.pkru_mask
    if mask and (pkru >> (2 * pkey)) & (mask >> ((pfec & PERMISSION_ACCESS_BITS) | (pte_access & _ACC_USER) << 1)) & 3:
        return PFERR_PRESENT_MASK | PFERR_PK_MASK
    idx = ((pfec & PERMISSION_ACCESS_BITS)
           | (PERMISSION_NOT_SMAP if ac and not pfec & PFERR_IMPLICIT_ACCESS else 0)) >> 1
    return PFERR_PRESENT_MASK if (ctx.permissions[idx] >> pte_access) & 1 else 0
