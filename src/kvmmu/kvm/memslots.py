"""Memslots: KVM_SET_USER_MEMORY_REGION semantics, the generation protocol, gfn->slot lookup.

Generation protocol (kvm_swap_active_memslots): every change publishes the new set with the
update-in-progress flag (bit 63) set on the old generation, then advances the generation by the
number of address spaces and clears the flag.  DELETE and MOVE first install an INVALID copy of the
slot (a swap of its own) and flush the slot's shadow pages before the real swap.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from ..arch.index import gfn_to_gpa, gpa_to_gfn
from ..errors import MemslotError

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEMSLOT_INVALID = 1 << 16
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = 1 << 63
KVM_USER_MEM_SLOTS = 32764
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
_VALID_USER_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY


@dataclass
class Memslot:
    id: int
    as_id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int
    dirty_bitmap: set[int] = field(default_factory=set)

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def invalid(self) -> bool:
        return bool(self.flags & KVM_MEMSLOT_INVALID)

    def gfn_to_hva(self, gfn: int) -> int:
        return self.userspace_addr + ((gfn - self.base_gfn) << 12)


class AddressSpace:
    """One address space's active memslot set, sorted by base gfn."""

    __slots__ = ("as_id", "generation", "by_id", "_bases", "_slots")

    def __init__(self, as_id: int, generation: int) -> None:
        self.as_id = as_id
        self.generation = generation
        self.by_id: dict[int, Memslot] = {}
        self._bases: list[int] = []
        self._slots: list[Memslot] = []

    def rebuild(self) -> None:
        self._slots = sorted(self.by_id.values(), key=lambda s: s.base_gfn)
        self._bases = [s.base_gfn for s in self._slots]

    def search(self, gfn: int) -> Memslot | None:
        i = bisect_right(self._bases, gfn) - 1
        if i >= 0:
            slot = self._slots[i]
            if gfn < slot.base_gfn + slot.npages:
                return slot
        return None

    def slots(self) -> list[Memslot]:
        return list(self._slots)


class Memslots:
    """All address spaces of a VM, with the callbacks into the MMU that a change triggers."""

    def __init__(self, nr_as: int = 2, initial_generation: int = 0, max_gfn: int = (1 << 40) - 1) -> None:
        self.nr_as = nr_as
        self.max_gfn = max_gfn
        # KVM starts address space i at generation i; a caller may start near the wrap.
        self.spaces = [AddressSpace(i, initial_generation + i) for i in range(nr_as)]
        self.lookups = 0           # gfn_to_memslot calls
        self.searches = 0          # tree searches (the per-vCPU last-used-slot cache missed)
        self.on_flush_slot: Callable[[Memslot], None] = lambda slot: None
        self.on_updated: Callable[[int, int], None] = lambda as_id, gen: None
        self.on_generation: Callable[[int, int], None] = lambda as_id, gen: None

    # -- lookup ------------------------------------------------------------------------------
    def gfn_to_memslot(self, gfn: int, as_id: int = 0, hint: list[Memslot | None] | None = None) -> Memslot | None:
        """`__gfn_to_memslot`; `hint` is a one-element list acting as the vCPU's last_used_slot."""
        self.lookups += 1
        if hint is not None:
            last = hint[0]
            if last is not None and last.base_gfn <= gfn < last.base_gfn + last.npages \
                    and self.spaces[as_id].by_id.get(last.id) is last:
                return last
        self.searches += 1
        slot = self.spaces[as_id].search(gfn)
        if hint is not None and slot is not None:
            hint[0] = slot
        return slot

    def generation(self, as_id: int = 0) -> int:
        return self.spaces[as_id].generation

    def slot(self, slot_id: int, as_id: int = 0) -> Memslot | None:
        return self.spaces[as_id].by_id.get(slot_id)

    def all_slots(self) -> list[Memslot]:
        return [s for sp in self.spaces for s in sp.slots()]

    # -- KVM_SET_USER_MEMORY_REGION ------------------------------------------------------------
    def validate(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                 userspace_addr: int) -> tuple[str, Memslot | None]:
        """Check a change the way `kvm_set_memory_region` does; returns (change, old slot)."""
        for name, value in (("slot", slot), ("flags", flags), ("guest_phys_addr", guest_phys_addr),
                            ("memory_size", memory_size), ("userspace_addr", userspace_addr)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >> 64:
                raise MemslotError(name, value, "must be an unsigned 64-bit integer")
        if flags & ~_VALID_USER_FLAGS:
            raise MemslotError("flags", flags, "only KVM_MEM_LOG_DIRTY_PAGES (1) and KVM_MEM_READONLY (2) exist")
        if memory_size & 0xFFF:
            raise MemslotError("memory_size", memory_size, "must be a multiple of the 4 KiB page size")
        if guest_phys_addr & 0xFFF:
            raise MemslotError("guest_phys_addr", guest_phys_addr, "must be page aligned")
        if userspace_addr & 0xFFF:
            raise MemslotError("userspace_addr", userspace_addr, "must be page aligned")
        as_id, sid = slot >> 16, slot & 0xFFFF
        if as_id >= self.nr_as:
            raise MemslotError("slot", slot, f"address space {as_id} does not exist (this VM has {self.nr_as})")
        if sid >= KVM_USER_MEM_SLOTS:
            raise MemslotError("slot", slot, f"slot id must be below KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})")
        if guest_phys_addr + memory_size > 1 << 64:
            raise MemslotError("guest_phys_addr", guest_phys_addr, "guest_phys_addr + memory_size overflows")
        npages = memory_size >> 12
        if npages > KVM_MEM_MAX_NR_PAGES:
            raise MemslotError("memory_size", memory_size, "a memslot holds at most 2^31-1 pages")
        space = self.spaces[as_id]
        old = space.by_id.get(sid)
        if npages == 0:
            if old is None:
                raise MemslotError("slot", slot, "deleting (memory_size 0) a slot that does not exist")
            return "delete", old
        base_gfn = gpa_to_gfn(guest_phys_addr)
        if old is None:
            change = "create"
        else:
            if userspace_addr != old.userspace_addr:
                raise MemslotError("userspace_addr", userspace_addr,
                                   "a live slot's backing cannot change; delete the slot first")
            if npages != old.npages:
                raise MemslotError("memory_size", memory_size, "a live slot cannot be resized; delete it first")
            if (flags ^ old.flags) & KVM_MEM_READONLY:
                raise MemslotError("flags", flags, "KVM_MEM_READONLY cannot be toggled on a live slot")
            if base_gfn != old.base_gfn:
                change = "move"
            elif flags != old.flags:
                change = "flags"
            else:
                return "none", old
        if base_gfn + npages - 1 > self.max_gfn:
            raise MemslotError("guest_phys_addr", guest_phys_addr,
                               f"the slot ends beyond the largest gfn the MMU can map ({self.max_gfn:#x})")
        if change in ("create", "move"):
            for other in space.by_id.values():
                if other.id != sid and base_gfn < other.end_gfn and other.base_gfn < base_gfn + npages:
                    raise MemslotError("guest_phys_addr", guest_phys_addr,
                                       f"overlaps slot {other.id} [{gfn_to_gpa(other.base_gfn):#x}, "
                                       f"{gfn_to_gpa(other.end_gfn):#x})", "EEXIST")
        return change, old

    def apply(self, change: str, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
              userspace_addr: int, old: Memslot | None,
              during: Callable[[], None] | None = None) -> Memslot | None:
        """Carry out a validated change with KVM's swap and flush sequence."""
        as_id, sid = slot >> 16, slot & 0xFFFF
        space = self.spaces[as_id]
        if change in ("delete", "move"):
            assert old is not None
            # Install an INVALID copy: faults on it now RETRY, then flush the slot's shadow pages.
            invalid = Memslot(old.id, as_id, old.base_gfn, old.npages, old.userspace_addr,
                              old.flags | KVM_MEMSLOT_INVALID, old.dirty_bitmap)
            space.by_id[sid] = invalid
            self._swap(space, lambda: None)
            self.on_flush_slot(invalid)
        if change == "delete":
            new = None

            def publish() -> None:
                del space.by_id[sid]
        else:
            new = Memslot(sid, as_id, gpa_to_gfn(guest_phys_addr), memory_size >> 12, userspace_addr, flags,
                          set() if old is None or change == "move" else old.dirty_bitmap)
            if not flags & KVM_MEM_LOG_DIRTY_PAGES:
                new.dirty_bitmap = set()

            def publish() -> None:
                space.by_id[sid] = new
        self._swap(space, publish, during)
        return new

    def _swap(self, space: AddressSpace, publish: Callable[[], None],
              during: Callable[[], None] | None = None) -> None:
        gen = space.generation
        space.generation = gen | KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
        self.on_generation(space.as_id, space.generation)
        publish()
        space.rebuild()
        if during is not None:
            during()        # whatever runs here sees the new slots with the in-progress flag set
        new_gen = (gen & ~KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS) + self.nr_as
        self.on_updated(space.as_id, new_gen)   # kvm_arch_memslots_updated (MMIO spte invalidation)
        space.generation = new_gen
        self.on_generation(space.as_id, new_gen)
