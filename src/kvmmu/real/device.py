"""/dev/kvm itself: whether it works here, and the ioctl call every RealVM and RealVcpu makes, which
turns an errno into a KvmIoctlError naming the ioctl.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
from typing import Any

from ..errors import InvalidArgument, KvmmuError
from . import ioctls as K

KVM_DEVICE = "/dev/kvm"


class KvmIoctlError(KvmmuError):
    """An ioctl other than a memslot change failed; names the ioctl, the errno and the values."""

    def __init__(self, ioctl: str, err: int, detail: str = "") -> None:
        self.ioctl, self.errno, self.errno_name = ioctl, err, errno.errorcode.get(err, str(err))
        extra = f": {detail}" if detail else ""
        super().__init__(f"{ioctl} failed with -{self.errno_name} ({os.strerror(err)}){extra}")



def ioctl(fd: int, request: int, arg: Any = 0, mutate: bool = False, detail: str = "") -> Any:
    try:
        if mutate:
            return fcntl.ioctl(fd, request, arg, True)
        return fcntl.ioctl(fd, request, arg)
    except InterruptedError:
        raise
    except OSError as e:
        raise KvmIoctlError(K.IOCTL_NAMES.get(request, hex(request)), e.errno or 0, detail) from None


def buffer_address(buf: mmap.mmap | bytearray) -> int:
    # from_buffer exports the buffer; dropping the ctypes object right away releases the export
    # so the mmap can still be closed later.
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def ioctl_enable_cap(fd: int, cap: int, args: tuple[int, ...]) -> None:
    """KVM_ENABLE_CAP on a VM or vCPU fd, with up to four arguments (the rest 0)."""
    if len(args) > 4:
        raise InvalidArgument("args", args, "KVM_ENABLE_CAP takes at most 4 arguments")
    padded = tuple(args) + (0,) * (4 - len(args))
    ioctl(fd, K.KVM_ENABLE_CAP, K.KVM_ENABLE_CAP_STRUCT.pack(cap, 0, *padded))


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
