"""RealVM / RealVcpu: the model's VM API driven against the real /dev/kvm through fcntl.ioctl.

Every fd and mapping is owned by exactly one object and released by ``close()`` (or the ``with``
block), so a test suite can create hundreds of VMs without waiting for the garbage collector.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from ..errors import InvalidArgument, KvmmuError, MemslotError
from . import ioctls as K
from .cpuid import CpuidEntry, for_vcpu, get_supported_cpuid, maxphyaddr, pack_cpuid2
from .longmode import flat_segments
from .stats import StatsReader, StatValue
from .vcpu_state import (
    SEGMENT_FIELDS,
    SREGS_FIELDS,
    DTable,
    MmioAccess,
    Segment,
    Sregs,
    Translation,
    VcpuEvents,
    VcpuExit,
)

KVM_DEVICE = "/dev/kvm"
PAGE_SIZE = 4096
# Python's mmap module lacks MAP_NORESERVE before 3.13; the Linux value is the same on every arch
# we can run on (x86-64).  Without it a large sparse guest would count fully against overcommit.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

MmioHandler = Callable[[MmioAccess], int | bytes | None]      # the same as kvmmu.VM.mmio_handler
IoHandler = Callable[..., int | bytes | None]


class KvmIoctlError(KvmmuError):
    """An ioctl other than a memslot change failed; names the ioctl, the errno and the values."""

    def __init__(self, ioctl: str, err: int, detail: str = "") -> None:
        self.ioctl, self.errno, self.errno_name = ioctl, err, errno.errorcode.get(err, str(err))
        extra = f": {detail}" if detail else ""
        super().__init__(f"{ioctl} failed with -{self.errno_name} ({os.strerror(err)}){extra}")


def _ioctl(fd: int, request: int, arg: Any = 0, mutate: bool = False, detail: str = "") -> Any:
    try:
        if mutate:
            return fcntl.ioctl(fd, request, arg, True)
        return fcntl.ioctl(fd, request, arg)
    except InterruptedError:
        raise
    except OSError as e:
        raise KvmIoctlError(K.IOCTL_NAMES.get(request, hex(request)), e.errno or 0, detail) from None


def _buffer_address(buf: mmap.mmap | bytearray) -> int:
    # from_buffer exports the buffer; dropping the ctypes object right away releases the export
    # so the mmap can still be closed later.
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view


# -- availability ---------------------------------------------------------------------------------
_probe_lock = threading.Lock()
_probe_result: list[str | None] = []


def unavailable_reason() -> str | None:
    """None when /dev/kvm can create a VM here, else one line saying why not (cached)."""
    with _probe_lock:
        if not _probe_result:
            _probe_result.append(_probe())
        return _probe_result[0]


def available() -> bool:
    """True when /dev/kvm exists, speaks API version 12 and lets us create a VM."""
    return unavailable_reason() is None


def _probe() -> str | None:
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {KVM_DEVICE}: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, K.KVM_GET_API_VERSION, 0)
        if version != K.KVM_API_VERSION:
            return f"{KVM_DEVICE} speaks KVM API version {version}, not {K.KVM_API_VERSION}"
        vm_fd = fcntl.ioctl(fd, K.KVM_CREATE_VM, 0)
        os.close(vm_fd)
    except OSError as e:
        return f"{KVM_DEVICE} is present but unusable: {e.strerror}"
    finally:
        os.close(fd)
    return None


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
            self._fd = _ioctl(self._kvm_fd, K.KVM_CREATE_VM, 0)
            self.vcpu_mmap_size: int = _ioctl(self._kvm_fd, K.KVM_GET_VCPU_MMAP_SIZE, 0)
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
        return int(_ioctl(self.fd, K.KVM_CHECK_EXTENSION, cap))

    def enable_cap(self, cap: int, *args: int) -> None:
        _ioctl(self.fd, K.KVM_ENABLE_CAP, K.KVM_ENABLE_CAP_STRUCT.pack(cap, 0, *_four(args)))

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
            hva = _buffer_address(backing)
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
        addr = _buffer_address(bitmap)
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
        fd = _ioctl(self.fd, K.KVM_CREATE_VCPU, vcpu_id, detail=f"vcpu id {vcpu_id}")
        try:
            if self.cpuid is not None:
                _ioctl(fd, K.KVM_SET_CPUID2, pack_cpuid2(for_vcpu(self.cpuid, vcpu_id)),
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
            self._stats = StatsReader(_ioctl(self.fd, K.KVM_GET_STATS_FD, 0))
        return self._stats.snapshot()

    @property
    def stats_reader(self) -> StatsReader:
        self.stats  # noqa: B018 - opens the fd on first use
        assert self._stats is not None
        return self._stats


def _four(args: tuple[int, ...]) -> tuple[int, int, int, int]:
    if len(args) > 4:
        raise InvalidArgument("args", args, "KVM_ENABLE_CAP takes at most 4 arguments")
    padded = tuple(args) + (0,) * (4 - len(args))
    return padded[0], padded[1], padded[2], padded[3]


class RealVcpu:
    """One vCPU: registers, sregs, events, KVM_RUN with an MMIO/PIO answering loop, stats."""

    def __init__(self, vm: RealVM, fd: int, vcpu_id: int) -> None:
        self.vm = vm
        self._fd = fd
        self.vcpu_id = vcpu_id
        self._stats: StatsReader | None = None
        self.run_page = mmap.mmap(fd, vm.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self.mmio_log: list[MmioAccess] = []
        self.last_exit: VcpuExit | None = None
        self._unanswered_read = False

    # -- lifetime ----------------------------------------------------------------------------
    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise KvmmuError(f"vcpu {self.vcpu_id} is closed")
        return self._fd

    def close(self) -> None:
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if not self.run_page.closed:
            self.run_page.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RealVcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- registers ---------------------------------------------------------------------------
    def get_regs(self) -> dict[str, int]:
        """The 18 general registers by name: rax..r15, rip, rflags."""
        buf = bytearray(K.KVM_REGS.size)
        _ioctl(self.fd, K.KVM_GET_REGS, buf, mutate=True)
        return dict(zip(K.REG_NAMES, K.KVM_REGS.unpack(buf), strict=True))

    def set_regs(self, **regs: int) -> None:
        """Change the named registers, keep the others (read-modify-write)."""
        bad = set(regs) - set(K.REG_NAMES)
        if bad:
            raise InvalidArgument("register", sorted(bad)[0], f"names are {', '.join(K.REG_NAMES)}")
        cur = self.get_regs()
        for name, value in regs.items():
            cur[name] = value & 0xFFFFFFFFFFFFFFFF
        _ioctl(self.fd, K.KVM_SET_REGS, K.KVM_REGS.pack(*(cur[n] for n in K.REG_NAMES)))

    def get_sregs(self) -> Sregs:
        buf = bytearray(K.KVM_SREGS_SIZE)
        _ioctl(self.fd, K.KVM_GET_SREGS, buf, mutate=True)
        return Sregs.unpack(buf)

    def set_sregs(self, sregs: Sregs | None = None, *, cpl: int | None = None,
                  rflags: int | None = None, **changes: Any) -> Sregs:
        """KVM_SET_SREGS of ``sregs`` (default: the current ones) with ``changes`` applied.

        A segment may be given as a Segment or as a dict of the fields to change; gdt/idt as a
        DTable or a (base, limit) pair.  As in the model's API, ``cpl`` (0 or 3) loads the flat
        code/data segments of that ring (the selectors of ``longmode``'s GDT) unless segments are
        given explicitly, and ``rflags`` is passed on to KVM_SET_REGS.  Returns what was written.
        """
        if cpl is not None:
            for name, seg in flat_segments(cpl).items():
                changes.setdefault(name, seg)
        bad = set(changes) - SREGS_FIELDS
        if bad:
            raise InvalidArgument("sregs field", sorted(bad)[0],
                                  f"fields are {', '.join(sorted(SREGS_FIELDS))}")
        base = sregs if sregs is not None else self.get_sregs()
        fixed: dict[str, Any] = {}
        for name, value in changes.items():
            cur = getattr(base, name)
            if isinstance(cur, Segment) and isinstance(value, Mapping):
                unknown = set(value) - SEGMENT_FIELDS
                if unknown:
                    raise InvalidArgument(f"{name} field", sorted(unknown)[0],
                                          f"fields are {', '.join(sorted(SEGMENT_FIELDS))}")
                value = replace(cur, **value)
            elif isinstance(cur, DTable) and isinstance(value, tuple):
                value = DTable(*value)
            fixed[name] = value
        new = replace(base, **fixed)
        _ioctl(self.fd, K.KVM_SET_SREGS, new.pack(),
               detail=f"cr0={new.cr0:#x} cr3={new.cr3:#x} cr4={new.cr4:#x} efer={new.efer:#x}")
        if rflags is not None:
            self.set_regs(rflags=rflags)
        return new

    def get_msrs(self, *indices: int) -> dict[int, int]:
        """KVM_GET_MSRS; MSRs KVM does not know are missing from the result."""
        buf = bytearray(K.KVM_MSRS_HEADER.pack(len(indices), 0))
        for index in indices:
            buf += K.KVM_MSR_ENTRY.pack(index, 0, 0)
        n = _ioctl(self.fd, K.KVM_GET_MSRS, buf, mutate=True)
        out = {}
        for i in range(n):
            index, _, data = K.KVM_MSR_ENTRY.unpack_from(buf, K.KVM_MSRS_HEADER.size
                                                         + i * K.KVM_MSR_ENTRY.size)
            out[index] = data
        return out

    def set_msrs(self, msrs: Mapping[int, int]) -> int:
        """KVM_SET_MSRS; returns how many were accepted (KVM stops at the first refusal)."""
        buf = bytearray(K.KVM_MSRS_HEADER.pack(len(msrs), 0))
        for index, data in msrs.items():
            buf += K.KVM_MSR_ENTRY.pack(index, 0, data)
        return int(_ioctl(self.fd, K.KVM_SET_MSRS, bytes(buf)))

    def get_vcpu_events(self) -> VcpuEvents:
        buf = bytearray(K.KVM_VCPU_EVENTS.size)
        _ioctl(self.fd, K.KVM_GET_VCPU_EVENTS, buf, mutate=True)
        return VcpuEvents.unpack(buf)

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        _ioctl(self.fd, K.KVM_SET_VCPU_EVENTS, events.pack())

    def translate(self, gva: int) -> Translation:
        """KVM_TRANSLATE (note: on kvm_pvm it sets A bits and reports writeable=1, usermode=0)."""
        buf = bytearray(K.KVM_TRANSLATION.pack(gva, 0, 0, 0, 0))
        _ioctl(self.fd, K.KVM_TRANSLATE, buf, mutate=True, detail=f"gva={gva:#x}")
        linear, phys, valid, writeable, usermode = K.KVM_TRANSLATION.unpack(buf)
        return Translation(linear, phys, bool(valid), bool(writeable), bool(usermode))

    def set_guest_debug(self, enable: bool = True, singlestep: bool = False, control: int = 0,
                        debugreg: tuple[int, ...] = ()) -> None:
        """KVM_SET_GUEST_DEBUG; single-stepping CPL0 code gives a "debug" exit per instruction."""
        if enable:
            control |= K.KVM_GUESTDBG_ENABLE
        if singlestep:
            control |= K.KVM_GUESTDBG_SINGLESTEP
        regs = tuple(debugreg) + (0,) * (8 - len(debugreg))
        _ioctl(self.fd, K.KVM_SET_GUEST_DEBUG, K.KVM_GUEST_DEBUG.pack(control, 0, *regs[:8]))

    def enable_cap(self, cap: int, *args: int) -> None:
        _ioctl(self.fd, K.KVM_ENABLE_CAP, K.KVM_ENABLE_CAP_STRUCT.pack(cap, 0, *_four(args)))

    @property
    def stats(self) -> dict[str, StatValue]:
        """A snapshot of this vCPU's binary stats (``pf_taken``, ``mmio_exits``, ``exits``, ...)."""
        if self._stats is None:
            self._stats = StatsReader(_ioctl(self.fd, K.KVM_GET_STATS_FD, 0))
        return self._stats.snapshot()

    # -- running -----------------------------------------------------------------------------
    def complete_mmio_read(self, value: int | bytes) -> None:
        """Answer the MMIO read the last exit asked for; the guest gets it on the next run()."""
        last = self.last_exit
        if last is None or last.reason != "mmio" or last.is_write:
            raise KvmmuError("complete_mmio_read: the last exit was not an MMIO read")
        assert last.len is not None and last.phys_addr is not None
        data = _as_bytes(value, last.len)
        self.run_page[K.RUN_MMIO_DATA:K.RUN_MMIO_DATA + 8] = data.ljust(8, b"\0")
        if self._unanswered_read:
            self.mmio_log[-1] = replace(self.mmio_log[-1], data=data)
            self._unanswered_read = False

    def complete_io_in(self, value: int | bytes) -> None:
        """Answer the IN the last exit asked for (``size * count`` bytes, or an int for count 1)."""
        last = self.last_exit
        if last is None or last.reason != "io" or last.is_write:
            raise KvmmuError("complete_io_in: the last exit was not a port read")
        assert last.size is not None and last.count is not None
        data = _as_bytes(value, last.size * last.count)
        off = K.RUN_IO.unpack_from(self.run_page, K.RUN_UNION)[4]
        self.run_page[off:off + len(data)] = data

    def run(self, mmio_handler: MmioHandler | None = None, io_handler: IoHandler | None = None,
            max_exits: int = 100_000, timeout: float | None = None) -> VcpuExit:
        """KVM_RUN until an exit nobody here handles, and return that exit.

        Without handlers this is one KVM_RUN.  With ``mmio_handler``, MMIO exits are answered and
        the guest re-entered; the handler has the model's signature (``VM.mmio_handler``): it is
        called with the exit's `MmioAccess` (phys_addr, len, is_write, data) and answers a read
        with an int (truncated to ``len`` bytes), bytes (the first ``len``, zero-padded) or None
        (nothing there: all ones), placed in kvm_run.mmio.data.  ``io_handler`` is for port I/O:
        ``handler(port, size)`` for IN, ``handler(port, size, value)`` for OUT; string I/O
        (count > 1) passes and expects ``size * count`` bytes instead of an int; None answers an
        IN with 0.  Every MMIO exit is appended to ``mmio_log``.  More than ``max_exits`` handled
        exits raises KvmmuError (a runaway guest).  ``timeout`` (seconds, main thread only)
        interrupts a guest that never exits (e.g. vmcall on kvm_pvm spins inside KVM_RUN) and
        returns an ``intr`` exit.
        """
        if timeout is None:
            return self._run_loop(mmio_handler, io_handler, max_exits)
        return self._run_with_timeout(mmio_handler, io_handler, max_exits, timeout)

    def _run_with_timeout(self, mmio_handler: MmioHandler | None, io_handler: IoHandler | None,
                          max_exits: int, timeout: float) -> VcpuExit:
        # SIGALRM interrupts KVM_RUN with -EINTR.  If it lands while we are in Python between two
        # KVM_RUNs, the handler sets immediate_exit so the next KVM_RUN returns at once instead.
        def on_alarm(signum: int, frame: object) -> None:
            if not self.run_page.closed:
                self.run_page[K.RUN_IMMEDIATE_EXIT] = 1

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return self._run_loop(mmio_handler, io_handler, max_exits)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if not self.run_page.closed:
                self.run_page[K.RUN_IMMEDIATE_EXIT] = 0

    def _run_loop(self, mmio_handler: MmioHandler | None, io_handler: IoHandler | None,
                  max_exits: int) -> VcpuExit:
        handled = 0
        while True:
            ex = self._run_once()
            if not ((ex.reason == "mmio" and mmio_handler is not None)
                    or (ex.reason == "io" and io_handler is not None)):
                return ex
            if handled >= max_exits:
                raise KvmmuError(f"vcpu {self.vcpu_id}: more than max_exits={max_exits} exits "
                                 f"without reaching hlt/shutdown; the next was {ex}")
            handled += 1
            if ex.reason == "mmio" and mmio_handler is not None:
                assert ex.len is not None
                reply = mmio_handler(self.mmio_log[-1])
                if not ex.is_write:
                    self.complete_mmio_read(_mmio_reply(reply, ex.len))
            elif ex.reason == "io" and io_handler is not None:
                assert ex.port is not None and ex.size is not None and ex.count is not None
                if ex.is_write:
                    io_handler(ex.port, ex.size, ex.value if ex.count == 1 else ex.data)
                else:
                    self.complete_io_in(_none_is_zero(io_handler(ex.port, ex.size)))

    def _run_once(self) -> VcpuExit:
        try:
            fcntl.ioctl(self.fd, K.KVM_RUN, 0)
        except InterruptedError:
            self.run_page[K.RUN_IMMEDIATE_EXIT] = 0
            ex = VcpuExit("intr", K.KVM_EXIT_INTR)
            self.last_exit = ex
            return ex
        except OSError as e:
            raise KvmIoctlError("KVM_RUN", e.errno or 0) from None
        ex = self._decode_exit()
        self.last_exit = ex
        if ex.reason == "mmio":
            assert ex.phys_addr is not None and ex.len is not None and ex.is_write is not None
            self.mmio_log.append(MmioAccess(ex.phys_addr, ex.len, ex.data, ex.is_write))
            self._unanswered_read = not ex.is_write
        return ex

    def _decode_exit(self) -> VcpuExit:
        page = self.run_page
        code = K.RUN_EXIT_REASON_FMT.unpack_from(page, K.RUN_EXIT_REASON)[0]
        reason = K.EXIT_REASONS.get(code, f"exit_{code}")
        if code == K.KVM_EXIT_MMIO:
            addr, data, length, is_write = K.RUN_MMIO.unpack_from(page, K.RUN_UNION)
            n = min(length, 8)
            return VcpuExit(reason, code, phys_addr=addr, len=length, is_write=bool(is_write),
                            data=data[:n] if is_write else None)
        if code == K.KVM_EXIT_IO:
            direction, size, port, count, off = K.RUN_IO.unpack_from(page, K.RUN_UNION)
            out = direction == K.KVM_EXIT_IO_OUT
            data = bytes(page[off:off + size * count]) if out else None
            return VcpuExit(reason, code, port=port, size=size, count=count, is_write=out,
                            data=data)
        if code == K.KVM_EXIT_INTERNAL_ERROR:
            fields = K.RUN_INTERNAL.unpack_from(page, K.RUN_UNION)
            suberror, ndata = fields[0], min(fields[1], 16)
            data_words = tuple(fields[2:2 + ndata])
            insn = None
            if (suberror == 1 and ndata >= 3
                    and data_words[0] & K.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES):
                # data[1..2] hold {u8 insn_size; u8 insn_bytes[15]}
                raw = b"".join(w.to_bytes(8, "little") for w in data_words[1:3])
                insn = raw[1:1 + min(raw[0], 15)]
            return VcpuExit(reason, code, suberror=suberror,
                            suberror_name=K.INTERNAL_ERROR_SUBERRORS.get(suberror),
                            internal_data=data_words, insn_bytes=insn)
        if code == K.KVM_EXIT_DEBUG:
            exc, _pad, pc, dr6, dr7 = K.RUN_DEBUG.unpack_from(page, K.RUN_UNION)
            return VcpuExit(reason, code, exception=exc, pc=pc, dr6=dr6, dr7=dr7)
        if code == K.KVM_EXIT_FAIL_ENTRY:
            hw_reason, _cpu = K.RUN_FAIL_ENTRY.unpack_from(page, K.RUN_UNION)
            return VcpuExit(reason, code, hardware_entry_failure_reason=hw_reason)
        return VcpuExit(reason, code)


def _none_is_zero(value: int | bytes | None) -> int | bytes:
    return 0 if value is None else value


def _mmio_reply(reply: object, length: int) -> int | bytes:
    """An MMIO read's answer as the model's VM takes it (kvm.vm.VM.vmm_mmio)."""
    if reply is None:
        return (1 << (8 * length)) - 1               # nothing there: the bus floats to all ones
    if isinstance(reply, (bytes, bytearray, memoryview)):
        return bytes(reply)[:length].ljust(length, b"\0")
    if isinstance(reply, int):
        return reply
    raise InvalidArgument("mmio_handler reply", reply, "the reply to a KVM_EXIT_MMIO read is an int, bytes or None")


def _as_bytes(value: int | bytes, length: int) -> bytes:
    if isinstance(value, int):
        return (value & ((1 << (8 * length)) - 1)).to_bytes(length, "little")
    data = bytes(value)
    if len(data) != length:
        raise InvalidArgument("data", data, f"the exit asked for exactly {length} bytes")
    return data
