"""CPUID for real vCPUs, as a VMM sets it: KVM_GET_SUPPORTED_CPUID, then KVM_SET_CPUID2.

What CPUID says is architectural state for KVM: the guest's MAXPHYADDR (leaf 0x80000008 EAX[7:0])
decides which PTE bits are reserved, leaf 0x80000001 EDX.Page1GB whether 1 GiB pages exist.  A vCPU
that never got KVM_SET_CPUID2 has no leaf 0x80000008, and KVM then assumes 36 physical-address bits
(``cpuid_query_maxphyaddr``): a guest frame with a bit from 36 up to the host's width set is a
reserved-bit #PF there, and just a high GPA once the VMM installs the supported CPUID.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

from . import ioctls as K

# cpuid_query_maxphyaddr: no leaf 0x80000008 in the vCPU's CPUID table
KVM_DEFAULT_MAXPHYADDR = 36
LEAF_EXT_ADDRESS_SIZES = 0x8000_0008
LEAF_EXT_FEATURES = 0x8000_0001
PAGE1GB = 1 << 26                                   # CPUID.80000001H:EDX[26]
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


@dataclass(frozen=True, slots=True)
class CpuidEntry:
    """struct kvm_cpuid_entry2 (the three pad words are always 0)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    def pack(self) -> bytes:
        return K.KVM_CPUID_ENTRY2.pack(self.function, self.index, self.flags, self.eax, self.ebx,
                                       self.ecx, self.edx, 0, 0, 0)


def pack_cpuid2(entries: tuple[CpuidEntry, ...]) -> bytearray:
    """struct kvm_cpuid2 with its entries, as KVM_SET_CPUID2 takes it."""
    buf = bytearray(K.KVM_CPUID2_HEADER.pack(len(entries), 0))
    for e in entries:
        buf += e.pack()
    return buf


def get_supported_cpuid(kvm_fd: int) -> tuple[CpuidEntry, ...]:
    """KVM_GET_SUPPORTED_CPUID on a /dev/kvm fd, growing the buffer while KVM answers E2BIG."""
    nent = 64
    while True:
        buf = bytearray(K.KVM_CPUID2_HEADER.pack(nent, 0) + bytes(K.KVM_CPUID_ENTRY2.size * nent))
        try:
            fcntl.ioctl(kvm_fd, K.KVM_GET_SUPPORTED_CPUID, buf, True)
        except OSError as e:
            if e.errno == errno.E2BIG and nent < 4096:
                nent *= 2
                continue
            raise
        count = K.KVM_CPUID2_HEADER.unpack_from(buf)[0]
        size = K.KVM_CPUID_ENTRY2.size
        return tuple(CpuidEntry(*K.KVM_CPUID_ENTRY2.unpack_from(buf, K.KVM_CPUID2_HEADER.size + i * size)[:7])
                     for i in range(count))


def for_vcpu(entries: tuple[CpuidEntry, ...], vcpu_id: int) -> tuple[CpuidEntry, ...]:
    """The supported table with this vCPU's APIC ID filled in, as VMMs do (leaf 1 EBX[31:24],
    the x2APIC ID in EDX of leaves 0xB and 0x1F)."""
    out = []
    for e in entries:
        if e.function == 1:
            e = replace(e, ebx=(e.ebx & 0x00FF_FFFF) | ((vcpu_id & 0xFF) << 24))
        elif e.function in (0xB, 0x1F):
            e = replace(e, edx=vcpu_id)
        out.append(e)
    return tuple(out)


def find(entries: tuple[CpuidEntry, ...] | None, function: int, index: int = 0) -> CpuidEntry | None:
    """kvm_find_cpuid_entry: the entry for (function, index); index matters only when flagged."""
    for e in entries or ():
        if e.function == function and (e.index == index or not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
            return e
    return None


def maxphyaddr(entries: tuple[CpuidEntry, ...] | None) -> int:
    """The guest MAXPHYADDR KVM derives from a vCPU's CPUID table (None: no KVM_SET_CPUID2)."""
    top = find(entries, 0x8000_0000)
    leaf = find(entries, LEAF_EXT_ADDRESS_SIZES)
    if top is None or top.eax < LEAF_EXT_ADDRESS_SIZES or leaf is None:
        return KVM_DEFAULT_MAXPHYADDR
    return leaf.eax & 0xFF


def gbpages(entries: tuple[CpuidEntry, ...] | None) -> bool:
    """Whether the table offers 1 GiB pages (KVM's ``is_gbpages`` / guest_cpuid_has(PDPE1GB))."""
    leaf = find(entries, LEAF_EXT_FEATURES)
    return leaf is not None and bool(leaf.edx & PAGE1GB)


# -- what a default RealVM gives its guests on this machine --------------------------------------
_host_lock = threading.Lock()
_host_cache: list[tuple[int, bool, str]] = []


_recorded: list[tuple[int, bool, str]] = []


def host_guest_paging() -> tuple[int, bool, str]:
    """(MAXPHYADDR, 1 GiB pages, source) that ``RealVM()`` (the supported CPUID) gives a guest here.

    Read from KVM_GET_SUPPORTED_CPUID on /dev/kvm; without a usable /dev/kvm, from the host CPU's
    ``address sizes`` in /proc/cpuinfo (what KVM would report), else KVM's no-CPUID default.
    Cached: the answer is a property of the machine.  Inside ``guest_paging_as`` it is the machine
    that recorded a run instead.
    """
    with _host_lock:
        if _recorded:
            return _recorded[-1]
        if not _host_cache:
            _host_cache.append(_measure_host())
        return _host_cache[0]


@contextlib.contextmanager
def guest_paging_as(maxphyaddr: int, gbpages: bool, source: str) -> Iterator[None]:
    """Within the block ``host_guest_paging()`` answers what another machine's supported CPUID
    gave its guests (a recorded lab run, ``kvmmu.lab``): a corpus program that builds its
    addresses from the guest width is then the program that machine ran."""
    with _host_lock:
        _recorded.append((maxphyaddr, gbpages, source))
    try:
        yield
    finally:
        with _host_lock:
            _recorded.pop()


def _measure_host() -> tuple[int, bool, str]:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            entries = get_supported_cpuid(fd)
            return maxphyaddr(entries), gbpages(entries), "KVM_GET_SUPPORTED_CPUID"
        except OSError:
            pass
        finally:
            os.close(fd)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            m = re.search(r"address sizes\s*:\s*(\d+) bits physical", f.read())
        if m:
            return int(m.group(1)), False, "/proc/cpuinfo"
    return KVM_DEFAULT_MAXPHYADDR, False, "KVM default (no CPUID)"


__all__ = ["KVM_DEFAULT_MAXPHYADDR", "CpuidEntry", "find", "for_vcpu", "gbpages", "get_supported_cpuid",
           "guest_paging_as", "host_guest_paging", "maxphyaddr", "pack_cpuid2"]
