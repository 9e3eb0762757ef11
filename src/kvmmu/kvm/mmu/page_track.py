"""Emulated writes to guest page tables that KVM shadows (kvm_mmu_track_write, which page_track.c's
kvm_page_track_write calls for every write the emulator makes to guest memory).

A write-tracked gfn holds a guest table with shadow pages: KVM cannot let the guest write it
directly, so each emulated write is judged here: a write that is not one whole gpte, or the third to
an upper-level table with no fault through it in between, zaps the shadow page; otherwise only the
sptes of the written gpte go, to be rebuilt on the next fault.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...arch.index import gpa_to_gfn
from .page import ShadowPage, role_quadrant
from .spte import SPTE_MMU_PRESENT_MASK

if TYPE_CHECKING:
    from .mmu import KvmMmu


def kvm_mmu_track_write(kvm: KvmMmu, gpa: int, nbytes: int, as_id: int = 0, pae: bool = False) -> None:
    """kvm_mmu_track_write: an emulated write of `nbytes` at `gpa` by a vCPU with CR4.PAE = `pae`.

    KVM widens a 4-byte write by a PAE vCPU to the aligned 8-byte gpte around it before judging it
    (mmu_pte_write_fetch_gpte: "a 32-bit guest writing two halves of a 64-bit gpte"), so a dword
    that straddles two gptes passes detect_write_misaligned and only the first gpte's spte is zapped;
    the second keeps its old translation, and no INVLPG or CR3 reload fixes it (the page is synced,
    not unsync).  That is what `kvm_deviations` does.  By default the write is judged as it was
    made: it spans two gptes, so the whole page is zapped and the new gptes are used (SDM 4.10.4).
    """
    if not kvm.indirect_shadow_pages:
        return
    fetch_gpa, fetch_bytes = gpa, nbytes
    if pae and nbytes == 4:
        fetch_gpa, fetch_bytes = gpa & ~7, 8
    # The gpte KVM reads back: only for 4- and 8-byte writes (it decides mmu_pde_zapped).
    gentry = kvm.vm.read_guest_quiet(fetch_gpa, fetch_bytes) if fetch_bytes in (4, 8) else 0
    if kvm.vm.kvm_deviations:
        gpa, nbytes = fetch_gpa, fetch_bytes
    kvm.stats["mmu_pte_write"] += 1
    gfn = gpa_to_gfn(gpa)
    invalid: list[ShadowPage] = []
    flush = False
    gfns = [gfn] + [g for _, g in kvm.host_page_aliases(gfn, as_id)]
    for sp in [sp for g in gfns for sp in kvm.indirect_pages_for_gfn(g)]:
        if sp.invalid:
            continue
        if _write_misaligned(sp, gpa, nbytes) or _write_flooding(sp):
            kvm.prepare_zap_page(sp, invalid)
            kvm.stats["mmu_flooded"] += 1
            continue
        for sptep in _written_sptes(sp, gpa):
            entry = kvm.read_spte(sptep)
            kvm.mmu_page_zap_pte(sp, sptep, None)
            if gentry and sp.level != 1:
                kvm.stats["mmu_pde_zapped"] += 1
            if entry & SPTE_MMU_PRESENT_MASK:
                flush = True
    kvm.vm.trace.emit("write_tracked_gpte", gpa=gpa, bytes=nbytes)
    if invalid:
        kvm.commit_zap_page(invalid)
    elif flush:
        kvm.flush_remote_tlbs()


def _write_misaligned(sp: ShadowPage, gpa: int, nbytes: int) -> bool:
    """A write that is not one whole gpte (single-byte writes at a gpte start are allowed)."""
    offset = gpa & 0xFFF
    pte_size = 4 if sp.role & (1 << 4) else 8
    if not offset & (pte_size - 1) and nbytes == 1:
        return False
    return bool((offset ^ (offset + nbytes - 1)) & ~(pte_size - 1)) or nbytes < 4


def _write_flooding(sp: ShadowPage) -> bool:
    """Three emulated writes to an upper-level table without a fault through it: stop shadowing it."""
    if sp.level == 1:
        return False
    sp.write_flooding_count += 1
    return sp.write_flooding_count >= 3


def _written_sptes(sp: ShadowPage, gpa: int) -> list[int]:
    """The sptes of sp that shadow the gpte at gpa (two for a 32-bit PDE: it maps 4 MiB)."""
    offset = gpa & 0xFFF
    n = 1
    if sp.role & (1 << 4):
        offset <<= 1
        if sp.level == 2:
            offset = (offset & ~7) << 1
            n = 2
        quadrant = offset >> 12
        offset &= 0xFFF
        if quadrant != role_quadrant(sp.role):
            return []
    first = sp.hpa + (offset & ~7)
    return [first + 8 * i for i in range(n)]


__all__ = ["kvm_mmu_track_write"]
