"""SPTE encoding (KVM's mmu/spte.[ch]): the masks of each flavour, ordinary sptes and MMIO sptes.

Shadow paging and NPT use x86 page-table entries; EPT uses EPT entries.  Both mark "KVM considers
this present" with software bit 11, and MMIO sptes are recognised purely by `mask`/`value`.
The MMIO generation's bit ranges are parameters (KVM has moved them over the years).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...arch.bits import (
    ACC_ALL,  # noqa: F401 - re-exported beside ACC_EXEC/ACC_WRITE/ACC_USER
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    BIT,
    GENMASK,
    PT64_ADDR_MASK,
    PT64_PKEY_SHIFT,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
)

SPTE_MMU_PRESENT_MASK = BIT(11)
SHADOW_NONPRESENT_VALUE = BIT(63)
SPTE_MMIO_ALLOWED_MASK = BIT(63) | GENMASK(51, 12) | GENMASK(2, 0)
ACC_EXEC, ACC_WRITE, ACC_USER = ACC_EXEC_MASK, ACC_WRITE_MASK, ACC_USER_MASK



@dataclass(frozen=True)
class MmioGenLayout:
    """Where the memslot generation lives in an MMIO spte: gen[0..n) -> spte low range, rest -> high."""

    low_start: int = 3
    low_end: int = 10
    high_start: int = 52
    high_end: int = 62

    @property
    def low_bits(self) -> int:
        return self.low_end - self.low_start + 1

    @property
    def bits(self) -> int:
        return self.low_bits + self.high_end - self.high_start + 1

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def spte_mask(self) -> int:
        return GENMASK(self.low_end, self.low_start) | GENMASK(self.high_end, self.high_start)

    def encode(self, gen: int) -> int:
        gen &= self.mask
        lo = gen & ((1 << self.low_bits) - 1)
        hi = gen >> self.low_bits
        return (lo << self.low_start) | (hi << self.high_start)

    def decode(self, spte: int) -> int:
        lo = (spte & GENMASK(self.low_end, self.low_start)) >> self.low_start
        hi = (spte & GENMASK(self.high_end, self.high_start)) >> self.high_start
        return lo | (hi << self.low_bits)


TODAY_GEN_LAYOUT = MmioGenLayout()


@dataclass(frozen=True)
class SpteMasks:
    """The shadow_*_mask globals for one flavour (kvm_mmu_reset_all_pte_masks / set_ept_masks)."""

    ept: bool
    present: int
    user: int
    x: int
    nx: int
    accessed: int
    dirty: int
    host_writable: int
    mmu_writable: int
    memtype: int
    mmio_mask: int
    mmio_value: int
    mmio_access_mask: int
    gen: MmioGenLayout | None
    mmio_max_gfn: int
    mmio_enabled: bool

    @property
    def writable(self) -> int:
        return BIT(1)


def mmio_spte_max_gfn(host_maxphyaddr: int, taken: int) -> int:
    """The largest gfn an MMIO spte gives back intact.

    KVM's get_mmio_spte_gfn keeps only spte bits (low_phys_bits - 1):12,
    `shadow_nonpresent_or_rsvd_lower_gfn_mask`, where low_phys_bits is the host's MAXPHYADDR on a
    CPU without L1TF (kvm_mmu_reset_all_pte_masks); `taken` (the MMIO marker and the generation)
    must lie above.  A larger gfn must not be cached in an spte (kvm_handle_noslot_fault emulates).
    """
    bits = min(host_maxphyaddr, 52)
    while taken & GENMASK(bits - 1, 12):
        bits -= 1
    return (1 << (bits - 12)) - 1


def shadow_masks(host_maxphyaddr: int = 46, gen: MmioGenLayout | None = TODAY_GEN_LAYOUT,
                 mmio_caching: bool = True) -> SpteMasks:
    """Shadow paging / NPT: MMIO sptes are present with reserved PA bit 51 (needs MAXPHYADDR < 52).

    Without a generation layout the 2011 encoding is used: one mask, every PA bit from MAXPHYADDR to
    62 plus P, and MMIO <=> (spte & mask) == mask.
    """
    enabled = mmio_caching and host_maxphyaddr < 52
    if gen is None:
        value = (GENMASK(62, host_maxphyaddr) | BIT(0)) if enabled else 0
    else:
        value = (BIT(51) | BIT(0)) if enabled else 0
    return SpteMasks(ept=False, present=BIT(0), user=BIT(2), x=0, nx=BIT(63), accessed=BIT(5),
                     dirty=BIT(6), host_writable=BIT(9), mmu_writable=BIT(10), memtype=0,
                     mmio_mask=value, mmio_value=value, mmio_access_mask=ACC_WRITE | ACC_USER, gen=gen,
                     mmio_max_gfn=mmio_spte_max_gfn(host_maxphyaddr, value | (gen.spte_mask if gen else 0)),
                     mmio_enabled=enabled)


def ept_masks(host_maxphyaddr: int = 46, gen: MmioGenLayout | None = TODAY_GEN_LAYOUT,
              mmio_caching: bool = True, ad: bool = True) -> SpteMasks:
    """EPT: MMIO sptes are W+X without R, an EPT misconfiguration (no reserved PA bit needed).

    Without a generation layout the 2011 encoding is used: mask = value = W+X plus bits 49-56.
    """
    if gen is None:
        mask = value = (0xFF << 49) | 0x6 if mmio_caching else 0
    else:
        mask, value = ((0x7 | BIT(63)), 0x6) if mmio_caching else (0, 0)
    return SpteMasks(ept=True, present=BIT(0) | BIT(63), user=BIT(0), x=BIT(2), nx=0,
                     accessed=BIT(8) if ad else 0, dirty=BIT(9) if ad else 0, host_writable=BIT(57),
                     mmu_writable=BIT(58), memtype=6 << 3, mmio_mask=mask,
                     mmio_value=value, mmio_access_mask=0, gen=gen,
                     mmio_max_gfn=mmio_spte_max_gfn(host_maxphyaddr, mask | (gen.spte_mask if gen else 0)),
                     mmio_enabled=mmio_caching)


def is_shadow_present_pte(spte: int) -> bool:
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def is_mmio_spte(m: SpteMasks, spte: int) -> bool:
    return m.mmio_enabled and (spte & m.mmio_mask) == m.mmio_value and not spte & SPTE_MMU_PRESENT_MASK


def is_large_pte(spte: int) -> bool:
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    return level == 1 or bool(spte & BIT(7))


def spte_to_pfn(spte: int) -> int:
    return (spte & PT64_ADDR_MASK) >> 12


def is_writable_pte(spte: int) -> bool:
    return bool(spte & PT_WRITABLE_MASK)


def make_mmio_spte(m: SpteMasks, gfn: int, access: int, generation: int) -> int:
    """make_mmio_spte: value | cached access | gpa | the generation's low bits (no in-progress flag)."""
    spte = m.mmio_value | (access & m.mmio_access_mask) | (gfn << 12)
    if m.gen is not None:
        spte |= m.gen.encode(generation)
    return spte


def get_mmio_spte_gfn(m: SpteMasks, spte: int) -> int:
    """The gfn bits of an MMIO spte: below the host's MAXPHYADDR (see mmio_spte_max_gfn)."""
    return (spte >> 12) & m.mmio_max_gfn


def get_mmio_spte_access(m: SpteMasks, spte: int) -> int:
    return spte & m.mmio_access_mask


def get_mmio_spte_generation(m: SpteMasks, spte: int) -> int:
    return 0 if m.gen is None else m.gen.decode(spte)


def make_nonleaf_spte(m: SpteMasks, child_hpa: int) -> int:
    """A link to a child table: present, writable, user, executable, accessed."""
    return (child_hpa & PT64_ADDR_MASK) | SPTE_MMU_PRESENT_MASK | m.present | BIT(1) | m.user | m.x | m.accessed


def make_spte(m: SpteMasks, level: int, pte_access: int, pfn: int, host_writable: bool,
              prefetch: bool = False, pkey: int = 0) -> int:
    """A leaf spte for `pfn` with the guest's access (before write-protection decisions).

    `pkey` is the guest leaf's protection key, which the CPU checks in the spte's bits 62:59 when it
    walks KVM's tables with CR4.PKE (a model choice: KVM offers no PKU with shadow paging, its sptes
    carry no key; docs/architecture/kvm-mmu.md)."""
    spte = SPTE_MMU_PRESENT_MASK | m.present | m.memtype | (pkey << PT64_PKEY_SHIFT)
    if not prefetch:
        spte |= m.accessed
    if level > 1:
        spte |= BIT(7)
    spte |= m.x if pte_access & ACC_EXEC else m.nx
    if pte_access & ACC_USER:
        spte |= m.user
    if host_writable:
        spte |= m.host_writable
    spte |= pfn << 12
    if host_writable and pte_access & ACC_WRITE:
        spte |= BIT(1) | m.mmu_writable | m.dirty
    return spte


def spte_access(m: SpteMasks, spte: int) -> int:
    """The ACC_* rights a present leaf spte grants."""
    acc = ACC_WRITE if spte & BIT(1) else 0
    if m.ept:
        acc |= (ACC_EXEC if spte & m.x else 0) | (ACC_USER if spte & m.user else 0)
    else:
        acc |= (0 if spte & m.nx else ACC_EXEC) | (ACC_USER if spte & m.user else 0)
    return acc
