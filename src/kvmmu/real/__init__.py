"""The model's VM API on the real /dev/kvm (fcntl.ioctl + mmap, standard library only).

Used to check the model against the kernel where /dev/kvm exists; ``available()`` says whether it
does.  On the kvm_pvm hosts this project is developed on, CPL0 guest code runs in KVM's instruction
emulator and 64-bit CPL3 code runs natively under the shadow MMU with mmio_caching=N (see
docs/real-kvm.md).
"""

from __future__ import annotations

from .cpuid import CpuidEntry, host_guest_paging
from .ioctls import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from .longmode import FlatLongMode, flat_long_mode_sregs, flat_segments, identity_map_2m
from .stats import StatDescriptor, StatsReader, stats_delta
from .vcpu_state import DTable, MmioAccess, Segment, Sregs, Translation, VcpuEvents, VcpuExit
from .vm import KvmIoctlError, RealVcpu, RealVM, available, unavailable_reason

__all__ = [
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "CpuidEntry", "DTable", "FlatLongMode", "KvmIoctlError",
    "MmioAccess", "RealVM", "RealVcpu", "Segment", "Sregs", "StatDescriptor", "StatsReader",
    "Translation", "VcpuEvents", "VcpuExit", "available", "flat_long_mode_sregs", "flat_segments",
    "host_guest_paging", "identity_map_2m", "stats_delta", "unavailable_reason",
]
