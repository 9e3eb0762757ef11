"""Shadow pages (`struct kvm_mmu_page`) and their role word (`union kvm_mmu_page_role`)."""

from __future__ import annotations

# Role bit positions (current layout).
ROLE_LEVEL_MASK = 0xF
ROLE_HAS_4_BYTE_GPTE = 1 << 4
ROLE_QUADRANT_SHIFT = 5
ROLE_DIRECT = 1 << 7
ROLE_ACCESS_SHIFT = 8
ROLE_INVALID = 1 << 11
ROLE_EFER_NX = 1 << 12
ROLE_CR0_WP = 1 << 13
ROLE_SMEP_ANDNOT_WP = 1 << 14
ROLE_SMAP_ANDNOT_WP = 1 << 15
ROLE_AD_DISABLED = 1 << 16
ROLE_GUEST_MODE = 1 << 17
ROLE_PASSTHROUGH = 1 << 18
# Not in KVM's role: without kvm_deviations the model keeps 32-bit guests' shadow pages apart by CR4.PSE
# (KVM shares them, so a PSE=0 vCPU can run on a 4 MiB mapping a PSE=1 vCPU's walk built).
ROLE_MODEL_CR4_PSE = 1 << 19
# Not in KVM's role either: the protection key of the guest large page a direct shadow page maps
# (bits 62:59 of the guest PDE/PDPTE), copied into its sptes; two guest large pages of one gfn range
# with different keys need different direct pages.  KVM has no such field: it offers no PKU with
# shadow paging (kvm_set_cpu_caps).
ROLE_MODEL_PKEY_SHIFT = 20
ROLE_MODEL_PKEY_MASK = 0xF << ROLE_MODEL_PKEY_SHIFT
ROLE_SMM_SHIFT = 24                    # smm: bits 31:24, as in KVM
# Model-only, above KVM's 32-bit role: CR4.PKE with CR0.WP=0 changes what the kernel-only sptes of
# CR0.WP=0 may be (paging.page_fault), as SMEP and SMAP do (KVM's smep_andnot_wp/smap_andnot_wp).
ROLE_MODEL_PKE_ANDNOT_WP = 1 << 32


def make_role(level: int, *, has_4_byte_gpte: bool = False, quadrant: int = 0, direct: bool = False,
              access: int = 7, efer_nx: bool = True, cr0_wp: bool = False, smep_andnot_wp: bool = False,
              smap_andnot_wp: bool = False, ad_disabled: bool = False, guest_mode: bool = False,
              passthrough: bool = False, smm: int = 0, cr4_pse: bool = False, pke_andnot_wp: bool = False) -> int:
    return (level | (ROLE_HAS_4_BYTE_GPTE if has_4_byte_gpte else 0) | (quadrant << ROLE_QUADRANT_SHIFT)
            | (ROLE_DIRECT if direct else 0) | (access << ROLE_ACCESS_SHIFT) | (ROLE_EFER_NX if efer_nx else 0)
            | (ROLE_CR0_WP if cr0_wp else 0) | (ROLE_SMEP_ANDNOT_WP if smep_andnot_wp else 0)
            | (ROLE_SMAP_ANDNOT_WP if smap_andnot_wp else 0) | (ROLE_AD_DISABLED if ad_disabled else 0)
            | (ROLE_GUEST_MODE if guest_mode else 0) | (ROLE_PASSTHROUGH if passthrough else 0)
            | (ROLE_MODEL_CR4_PSE if cr4_pse else 0) | (smm << ROLE_SMM_SHIFT)
            | (ROLE_MODEL_PKE_ANDNOT_WP if pke_andnot_wp else 0))


def role_smm(role: int) -> int:
    """The address space (role.smm) a shadow page was built from."""
    return (role >> ROLE_SMM_SHIFT) & 0xFF


def role_level(role: int) -> int:
    return role & ROLE_LEVEL_MASK


def role_access(role: int) -> int:
    return (role >> ROLE_ACCESS_SHIFT) & 7


def role_quadrant(role: int) -> int:
    return (role >> ROLE_QUADRANT_SHIFT) & 3


def role_pkey(role: int) -> int:
    return (role & ROLE_MODEL_PKEY_MASK) >> ROLE_MODEL_PKEY_SHIFT


def child_role(parent: int, index: int, direct: bool, access: int, pkey: int = 0) -> int:
    """kvm_mmu_child_role: one level down, new access/direct, quadrant from the parent index
    (and, for a direct page under shadow paging, the guest large page's key: ROLE_MODEL_PKEY)."""
    role = (parent & ~(ROLE_LEVEL_MASK | ROLE_DIRECT | (7 << ROLE_ACCESS_SHIFT) | ROLE_PASSTHROUGH
                       | (3 << ROLE_QUADRANT_SHIFT) | ROLE_MODEL_PKEY_MASK))
    role |= (role_level(parent) - 1) | (ROLE_DIRECT if direct else 0) | (access << ROLE_ACCESS_SHIFT)
    role |= pkey << ROLE_MODEL_PKEY_SHIFT
    if parent & ROLE_HAS_4_BYTE_GPTE:
        # A 4-byte PDE covers 4 MiB, i.e. two PAE page tables: which half is this child?
        role |= (index & 1) << ROLE_QUADRANT_SHIFT
    return role


def describe_role(role: int) -> str:
    parts = [f"level={role_level(role)}"]
    for name, bit in (("direct", ROLE_DIRECT), ("4byte", ROLE_HAS_4_BYTE_GPTE), ("invalid", ROLE_INVALID),
                      ("cr0_wp", ROLE_CR0_WP), ("guest_mode", ROLE_GUEST_MODE)):
        if role & bit:
            parts.append(name)
    parts.append(f"access={role_access(role):o}")
    if role & ROLE_MODEL_PKEY_MASK:
        parts.append(f"pkey={role_pkey(role)}")
    if role & ROLE_HAS_4_BYTE_GPTE:
        parts.append(f"quadrant={role_quadrant(role)}")
    return " ".join(parts)


class ShadowPage:
    """One page of KVM's tables: 512 sptes in host memory at `hpa`, shadowing `gfn` under `role`."""

    __slots__ = ("gfn", "role", "level", "direct", "hpa", "parent_ptes", "root_count", "unsync",
                 "unsync_children", "write_flooding_count", "mmu_valid_gen", "shadowed_translation",
                 "accounted", "invalid", "tdp")

    def __init__(self, gfn: int, role: int, hpa: int, mmu_valid_gen: int) -> None:
        self.gfn = gfn
        self.role = role
        self.level = role & ROLE_LEVEL_MASK
        self.direct = bool(role & ROLE_DIRECT)
        self.hpa = hpa
        self.parent_ptes: set[int] = set()
        self.root_count = 0
        self.unsync = False
        self.unsync_children: set[int] = set()
        self.write_flooding_count = 0
        self.mmu_valid_gen = mmu_valid_gen
        # (gfn << 12) | access of what each leaf spte maps; indirect pages only.
        self.shadowed_translation: list[int] | None = None if self.direct else [0] * 512
        self.accounted = False
        self.invalid = False
        self.tdp = False

    def sptep(self, index: int) -> int:
        return self.hpa + 8 * index

    def gfn_at(self, index: int) -> int:
        """kvm_mmu_page_get_gfn."""
        if self.shadowed_translation is not None:
            return self.shadowed_translation[index] >> 12
        if self.role & ROLE_PASSTHROUGH:
            return self.gfn
        return self.gfn + (index << (9 * (self.level - 1)))

    def __repr__(self) -> str:
        return f"<sp gfn={self.gfn:#x} {describe_role(self.role)}{' unsync' if self.unsync else ''}>"


def trace_fields(sp: ShadowPage) -> dict[str, int | bool]:
    """What KVM_MMU_PAGE_ASSIGN records of a shadow page for the kvmmmu page events."""
    return {"mmu_valid_gen": sp.mmu_valid_gen, "gfn": sp.gfn, "role": sp.role & 0xFFFF_FFFF,
            "root_count": sp.root_count, "unsync": sp.unsync}
