"""RealVM: the model's VM API driven against the real /dev/kvm through fcntl.ioctl — the VM fd, its
memslots and guest RAM (anonymous mappings the VMM owns), dirty logs, stats and vCPU creation.  The
vCPUs are real/vcpu.py, the device and the ioctl wrapper real/device.py; their public names are
importable from here too.

Every fd and mapping is owned by exactly one object and released by ``close()`` (or the ``with``
block), so a test suite can create hundreds of VMs without waiting for the garbage collector.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from collections.abc import Iterator

from ..errors import InvalidArgument, KvmmuError, MemslotError
from . import ioctls as K
from .cpuid import CpuidEntry, for_vcpu, get_supported_cpuid, maxphyaddr, pack_cpuid2
from .device import (
    KVM_DEVICE,
    KvmIoctlError,
    available,
    buffer_address,
    ioctl,
    ioctl_enable_cap,
    unavailable_reason,
)
from .stats import StatsReader, StatValue
from .vcpu import IoHandler, MmioHandler, RealVcpu

PAGE_SIZE = 4096
# Python's mmap module lacks MAP_NORESERVE before 3.13; the Linux value is the same on every arch
# we can run on (x86-64).  Without it a large sparse guest would count fully against overcommit.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


# -- memslots -------------------------------------------------------------------------------------
class _Slot:
    __slots__ = ("slot", "gpa", "size", "flags", "backing", "hva")

    def __init__(self, slot: int, gpa: int, size: int, flags: int, backing: mmap.mmap,
                 hva: int) -> None:
        self.slot, self.gpa, self.size, self.flags = slot, gpa, size, flags
        self.backing, self.hva = backing, hva

    @property
    def end(self) -> int:
        return self.gpa + self.size


class RealVM:
    """A VM on the real /dev/kvm with the model's memslot / memory / vCPU methods.

    ``cpuid``: what every vCPU gets with KVM_SET_CPUID2 before it first runs — ``"supported"``
    (the default, as VMMs do: KVM_GET_SUPPORTED_CPUID with each vCPU's APIC ID filled in), a tuple
    of ``CpuidEntry``, or None for no KVM_SET_CPUID2 at all (KVM's defaults, e.g. a 36-bit guest
    MAXPHYADDR).  ``guest_maxphyaddr`` is the width KVM derives from it.  ``hugepages``: the VMM asks
    for transparent huge pages for guest RAM (madvise MADV_HUGEPAGE on each slot's backing, as QEMU
    does), so the host may back it with 2 MiB pages.
    """

    def __init__(self, cpuid: str | tuple[CpuidEntry, ...] | None = "supported", hugepages: bool = False) -> None:
        self.hugepages = hugepages
        self._kvm_fd = -1
        self._fd = -1
        self._slots: dict[int, _Slot] = {}
        self._vcpus: list[RealVcpu] = []
        self._stats: StatsReader | None = None
        try:
            self._kvm_fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmIoctlError(f"open({KVM_DEVICE})", e.errno or 0) from None
        try:
            self._fd = ioctl(self._kvm_fd, K.KVM_CREATE_VM, 0)
            self.vcpu_mmap_size: int = ioctl(self._kvm_fd, K.KVM_GET_VCPU_MMAP_SIZE, 0)
            self.cpuid: tuple[CpuidEntry, ...] | None = self._resolve_cpuid(cpuid)
        except BaseException:
            self.close()
            raise

    def _resolve_cpuid(self, cpuid: str | tuple[CpuidEntry, ...] | None) -> tuple[CpuidEntry, ...] | None:
        if cpuid is None:
            return None
        if cpuid == "supported":
            try:
                return get_supported_cpuid(self._kvm_fd)
            except OSError as e:
                raise KvmIoctlError("KVM_GET_SUPPORTED_CPUID", e.errno or 0) from None
        if isinstance(cpuid, tuple) and all(isinstance(e, CpuidEntry) for e in cpuid):
            return cpuid
        raise InvalidArgument("cpuid", cpuid, '"supported", a tuple of CpuidEntry, or None '
                              "(no KVM_SET_CPUID2)")

    @property
    def guest_maxphyaddr(self) -> int:
        """The guest MAXPHYADDR KVM uses for this VM's vCPUs (from ``cpuid``; 36 without one)."""
        return maxphyaddr(self.cpuid)

    # -- lifetime ----------------------------------------------------------------------------
    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise KvmmuError("the RealVM is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Release vCPUs, stats fds, the VM fd and then the guest RAM mappings."""
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        for attr in ("_fd", "_kvm_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        # Only now: the VM (and so every user of the memory) is gone.
        for s in self._slots.values():
            s.backing.close()
        self._slots.clear()

    def __enter__(self) -> RealVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A safety net only; tests use ``with`` so that fds go back deterministically.  During
        # interpreter shutdown module globals may already be gone, hence the broad except.
        if getattr(self, "_fd", -1) >= 0 or getattr(self, "_kvm_fd", -1) >= 0:
            with contextlib.suppress(Exception):
                self.close()

    # -- capabilities ------------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (per-VM answers, e.g. KVM_CAP_NR_MEMSLOTS)."""
        return int(ioctl(self.fd, K.KVM_CHECK_EXTENSION, cap))

    def enable_cap(self, cap: int, *args: int) -> None:
        ioctl_enable_cap(self.fd, cap, args)

    # -- memslots ----------------------------------------------------------------------------
    @property
    def memslots(self) -> dict[int, tuple[int, int, int]]:
        """slot id -> (guest_phys_addr, memory_size, flags) of every live slot."""
        return {s.slot: (s.gpa, s.size, s.flags) for s in self._slots.values()}

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION with VM-owned anonymous backing.

        A new slot gets fresh zeroed memory; re-issuing a live slot (move, flag change) keeps its
        memory, as KVM requires the same userspace_addr; size 0 deletes it and frees the memory.
        """
        for what, value in (("slot", slot), ("guest_phys_addr", guest_phys_addr),
                            ("memory_size", memory_size), ("flags", flags)):
            if not isinstance(value, int) or value < 0 or value.bit_length() > (
                    32 if what in ("slot", "flags") else 64):
                raise MemslotError(what, value, "must be an unsigned integer that fits the "
                                   "kvm_userspace_memory_region field", "EINVAL")
        old = self._slots.get(slot)
        backing: mmap.mmap | None = None
        if old is not None:
            hva = old.hva
        elif memory_size == 0:
            hva = 0
        else:
            try:
                backing = mmap.mmap(-1, memory_size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                    | _MAP_NORESERVE, mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, OverflowError, ValueError) as e:
                raise MemslotError("memory_size", memory_size,
                                   f"the VMM could not allocate the backing memory ({e})",
                                   "ENOMEM") from None
            if self.hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
                backing.madvise(mmap.MADV_HUGEPAGE)
            hva = buffer_address(backing)
        region = K.KVM_USERSPACE_MEMORY_REGION.pack(slot, flags, guest_phys_addr, memory_size, hva)
        try:
            fcntl.ioctl(self.fd, K.KVM_SET_USER_MEMORY_REGION, region)
        except OSError as e:
            if backing is not None:
                backing.close()
            err = e.errno or 0
            what, value, rule = self._explain_memslot_error(slot, guest_phys_addr, memory_size,
                                                            flags, err)
            raise MemslotError(what, value, rule, errno.errorcode.get(err, str(err))) from None
        if memory_size == 0:
            if old is not None:
                del self._slots[slot]
                old.backing.close()
            return
        if old is not None:
            old.gpa, old.size, old.flags = guest_phys_addr, memory_size, flags
        else:
            assert backing is not None
            self._slots[slot] = _Slot(slot, guest_phys_addr, memory_size, flags, backing, hva)

    def _explain_memslot_error(self, slot: int, gpa: int, size: int, flags: int,
                               err: int) -> tuple[str, int, str]:
        """Name the value and the rule KVM most likely applied (it returns only an errno)."""
        nr = self._cap_or_none(K.KVM_CAP_NR_MEMSLOTS)
        as_id, slot_id = slot >> 16, slot & 0xFFFF
        old = self._slots.get(slot)
        if flags & ~(K.KVM_MEM_LOG_DIRTY_PAGES | K.KVM_MEM_READONLY):
            return "flags", flags, "only KVM_MEM_LOG_DIRTY_PAGES (1) and KVM_MEM_READONLY (2) " \
                                   "are supported here"
        if as_id:
            return "slot", slot, f"address space {as_id} does not exist (bits 16+ of slot select it)"
        if nr is not None and slot_id >= nr:
            return "slot", slot, f"slot ids run from 0 to {nr - 1} (KVM_CAP_NR_MEMSLOTS = {nr})"
        if size % PAGE_SIZE:
            return "memory_size", size, "must be a multiple of 4 KiB"
        if gpa % PAGE_SIZE:
            return "guest_phys_addr", gpa, "must be 4 KiB aligned"
        if size == 0 and old is None:
            return "slot", slot, "deleting a slot that does not exist"
        if old is not None and size != 0:
            if size != old.size:
                return "memory_size", size, (f"slot {slot} is live with size {old.size:#x}; "
                                             "delete it before resizing")
            if (flags ^ old.flags) & K.KVM_MEM_READONLY:
                return "flags", flags, (f"KVM_MEM_READONLY of live slot {slot} cannot change; "
                                        "delete it first")
        end = gpa + size
        for other in self._slots.values():
            if other.slot != slot and gpa < other.end and other.gpa < end:
                return "guest_phys_addr", gpa, (
                    f"[{gpa:#x}, {end:#x}) overlaps slot {other.slot} "
                    f"[{other.gpa:#x}, {other.end:#x})")
        if err == errno.EINVAL and size:
            return "guest_phys_addr", gpa, (f"[{gpa:#x}, {end:#x}) is beyond the guest physical "
                                            "address space KVM accepts, or KVM refused it")
        return "slot", slot, f"KVM_SET_USER_MEMORY_REGION refused it: {os.strerror(err)}"

    def _cap_or_none(self, cap: int) -> int | None:
        try:
            return self.check_extension(cap)
        except KvmIoctlError:
            return None

    def _pieces(self, gpa: int, length: int) -> Iterator[tuple[_Slot, int, int]]:
        """(slot, offset in slot, length) pieces covering [gpa, gpa+length), in order."""
        if gpa < 0 or length < 0:
            raise InvalidArgument("gpa", gpa, "addresses and lengths are non-negative")
        while length:
            for s in self._slots.values():
                if s.gpa <= gpa < s.end:
                    n = min(length, s.end - gpa)
                    yield s, gpa - s.gpa, n
                    gpa += n
                    length -= n
                    break
            else:
                raise InvalidArgument("gpa", gpa, "is not backed by any memslot, so the VMM has "
                                      "no memory there (the guest would see MMIO)")

    def write_phys(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest RAM through the VMM's mapping (ignores KVM_MEM_READONLY, as a VMM does)."""
        data = memoryview(data).cast("B")
        pos = 0
        for s, off, n in list(self._pieces(gpa, len(data))):
            s.backing[off:off + n] = data[pos:pos + n]
            pos += n

    def read_phys(self, gpa: int, length: int) -> bytes:
        """Read guest RAM through the VMM's mapping."""
        return b"".join(s.backing[off:off + n] for s, off, n in self._pieces(gpa, length))

    def get_dirty_log(self, slot: int) -> set[int]:
        """KVM_GET_DIRTY_LOG: indexes (from the slot start) of pages dirtied since the last call.

        The call also clears the log and re-write-protects the pages, as in KVM.
        """
        s = self._slots.get(slot)
        if s is None:
            raise MemslotError("slot", slot, "is not a live memslot of this VM", "ENOENT")
        npages = s.size // PAGE_SIZE
        nwords = (npages + 63) // 64
        bitmap = bytearray(8 * nwords)
        addr = buffer_address(bitmap)
        try:
            fcntl.ioctl(self.fd, K.KVM_GET_DIRTY_LOG, K.KVM_DIRTY_LOG.pack(slot, 0, addr))
        except OSError as e:
            err = e.errno or 0
            rule = ("needs KVM_MEM_LOG_DIRTY_PAGES on the slot" if err == errno.ENOENT
                    else f"KVM_GET_DIRTY_LOG failed: {os.strerror(err)}")
            raise MemslotError("slot", slot, rule, errno.errorcode.get(err, str(err))) from None
        bits = int.from_bytes(bitmap, "little")
        out: set[int] = set()
        while bits:
            low = bits & -bits
            out.add(low.bit_length() - 1)
            bits ^= low
        return out

    # -- vCPUs and stats ---------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int | None = None) -> RealVcpu:
        """KVM_CREATE_VCPU (ids count up from 0 unless given), KVM_SET_CPUID2 of the VM's ``cpuid``
        and map its kvm_run page."""
        if vcpu_id is None:
            vcpu_id = max((v.vcpu_id for v in self._vcpus), default=-1) + 1
        fd = ioctl(self.fd, K.KVM_CREATE_VCPU, vcpu_id, detail=f"vcpu id {vcpu_id}")
        try:
            if self.cpuid is not None:
                ioctl(fd, K.KVM_SET_CPUID2, pack_cpuid2(for_vcpu(self.cpuid, vcpu_id)),
                       detail=f"vcpu id {vcpu_id}, {len(self.cpuid)} entries")
            vcpu = RealVcpu(self, fd, vcpu_id)
        except BaseException:
            os.close(fd)
            raise
        self._vcpus.append(vcpu)
        return vcpu

    @property
    def vcpus(self) -> tuple[RealVcpu, ...]:
        return tuple(self._vcpus)

    @property
    def stats(self) -> dict[str, StatValue]:
        """A snapshot of the VM's binary stats (``mmu_shadow_zapped``, ``pages_4k``, ...)."""
        if self._stats is None:
            self._stats = StatsReader(ioctl(self.fd, K.KVM_GET_STATS_FD, 0))
        return self._stats.snapshot()

    @property
    def stats_reader(self) -> StatsReader:
        self.stats  # noqa: B018 - opens the fd on first use
        assert self._stats is not None
        return self._stats


__all__ = ["KVM_DEVICE", "PAGE_SIZE", "IoHandler", "KvmIoctlError", "MmioHandler", "RealVM", "RealVcpu", "available",
           "unavailable_reason"]
