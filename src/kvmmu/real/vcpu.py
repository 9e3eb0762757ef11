"""RealVcpu: one vCPU on the real /dev/kvm — its registers, sregs, MSRs and events, and KVM_RUN with a
loop that answers MMIO and port I/O exits the way the model's VM answers them.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgument, KvmmuError
from . import ioctls as K
from .device import KvmIoctlError, ioctl, ioctl_enable_cap
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

if TYPE_CHECKING:
    from .vm import RealVM

MmioHandler = Callable[[MmioAccess], int | bytes | None]      # the same as kvmmu.VM.mmio_handler
IoHandler = Callable[..., int | bytes | None]


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
        ioctl(self.fd, K.KVM_GET_REGS, buf, mutate=True)
        return dict(zip(K.REG_NAMES, K.KVM_REGS.unpack(buf), strict=True))

    def set_regs(self, **regs: int) -> None:
        """Change the named registers, keep the others (read-modify-write)."""
        bad = set(regs) - set(K.REG_NAMES)
        if bad:
            raise InvalidArgument("register", sorted(bad)[0], f"names are {', '.join(K.REG_NAMES)}")
        cur = self.get_regs()
        for name, value in regs.items():
            cur[name] = value & 0xFFFFFFFFFFFFFFFF
        ioctl(self.fd, K.KVM_SET_REGS, K.KVM_REGS.pack(*(cur[n] for n in K.REG_NAMES)))

    def get_sregs(self) -> Sregs:
        buf = bytearray(K.KVM_SREGS_SIZE)
        ioctl(self.fd, K.KVM_GET_SREGS, buf, mutate=True)
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
        ioctl(self.fd, K.KVM_SET_SREGS, new.pack(),
               detail=f"cr0={new.cr0:#x} cr3={new.cr3:#x} cr4={new.cr4:#x} efer={new.efer:#x}")
        if rflags is not None:
            self.set_regs(rflags=rflags)
        return new

    def get_msrs(self, *indices: int) -> dict[int, int]:
        """KVM_GET_MSRS; MSRs KVM does not know are missing from the result."""
        buf = bytearray(K.KVM_MSRS_HEADER.pack(len(indices), 0))
        for index in indices:
            buf += K.KVM_MSR_ENTRY.pack(index, 0, 0)
        n = ioctl(self.fd, K.KVM_GET_MSRS, buf, mutate=True)
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
        return int(ioctl(self.fd, K.KVM_SET_MSRS, bytes(buf)))

    def get_vcpu_events(self) -> VcpuEvents:
        buf = bytearray(K.KVM_VCPU_EVENTS.size)
        ioctl(self.fd, K.KVM_GET_VCPU_EVENTS, buf, mutate=True)
        return VcpuEvents.unpack(buf)

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        ioctl(self.fd, K.KVM_SET_VCPU_EVENTS, events.pack())

    def translate(self, gva: int) -> Translation:
        """KVM_TRANSLATE (note: on kvm_pvm it sets A bits and reports writeable=1, usermode=0)."""
        buf = bytearray(K.KVM_TRANSLATION.pack(gva, 0, 0, 0, 0))
        ioctl(self.fd, K.KVM_TRANSLATE, buf, mutate=True, detail=f"gva={gva:#x}")
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
        ioctl(self.fd, K.KVM_SET_GUEST_DEBUG, K.KVM_GUEST_DEBUG.pack(control, 0, *regs[:8]))

    def enable_cap(self, cap: int, *args: int) -> None:
        ioctl_enable_cap(self.fd, cap, args)

    @property
    def stats(self) -> dict[str, StatValue]:
        """A snapshot of this vCPU's binary stats (``pf_taken``, ``mmio_exits``, ``exits``, ...)."""
        if self._stats is None:
            self._stats = StatsReader(ioctl(self.fd, K.KVM_GET_STATS_FD, 0))
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
