"""The operations a program can yield (its system calls): compute, user and kernel accesses, mmap,
munmap, brk, fork, exec, exit, wait, file reads and writes, sleep, and a workload's own routines."""

from __future__ import annotations

from typing import Any, ClassVar

from .kmem import KernelMemory
from .layout import FIXMAP_HPET, VMALLOC
from .params import GuestPanic, Op
from .state import OpHandler
from .structs import Cpu, Process


class Syscalls(KernelMemory):
    """GuestOS's system calls (a mixin: state.KernelState)."""

    def _op_compute(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        limit = min(end, cpu.next_tick if cpu.ticking else end, cpu.events.next_time if cpu.events else end)
        run = max(1, min(proc.compute_left, limit - cpu.clock))
        self._charge(cpu, run)
        proc.compute_left -= run
        return proc.compute_left <= 0, None

    def _user_access(self, cpu: Cpu, proc: Process, gva: int, size: int, kind: str, value: int | None,
                     cpl: int) -> tuple[bool, Any]:
        vcpu = cpu.vcpu
        for _ in range(4):
            r = vcpu.access(gva, size, kind, value, cpl=cpl)
            if r.fault is None:
                return True, r.value
            if r.fault.vector != 14:
                raise GuestPanic(f"{proc.name}[{proc.pid}]: exception {r.fault} at {gva:#x}")
            self._account(cpu)
            res = self.page_fault(cpu, proc, r.fault, cpu.clock)
            if res == "blocked":
                return False, None
            if res == "segv":
                self.do_exit(cpu, proc, cpu.clock)
                return True, None
        raise GuestPanic(f"{proc.name}[{proc.pid}]: access to {gva:#x} faulted repeatedly")

    def _op_access(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        # ("access", gva, size, kind[, value])
        return self._user_access(cpu, proc, op[1], op[2], op[3], op[4] if len(op) > 4 else None, 3)

    def _op_kaccess(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        # ("kaccess", gva, size, kind[, value]): a CPL0 access: a kernel address (a driver's register
        # through ioremap / the fixmap, or kernel memory) or a user address (copy_to/from_user)
        gva, size, kind = op[1], op[2], op[3]
        value = op[4] if len(op) > 4 else None
        if gva < 1 << 47:
            return self._user_access(cpu, proc, gva, size, kind, value, 0)
        fb = self.ioremaps.get("framebuffer")
        in_fb = fb is not None and fb <= gva < fb + (self.machine.spec.framebuffer_mib << 20)
        if (VMALLOC <= gva < VMALLOC + (1 << 39) or gva >= FIXMAP_HPET) and not in_fb:   # the framebuffer is RAM
            return True, self.mmio(cpu.vcpu, gva, size, kind, value)
        r = cpu.vcpu.access(gva, size, kind, value, cpl=0)
        if r.fault is not None:
            raise GuestPanic(f"kernel access at {gva:#x} faulted: {r.fault}")
        return True, r.value

    def _op_mmap(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        self._charge(cpu, self.p.cost_syscall)
        return True, self.do_mmap(proc, op[1], op[2] if len(op) > 2 else True)

    def _op_munmap(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        self._charge(cpu, self.p.cost_syscall)
        self.do_munmap(cpu, proc, op[1], op[2])
        return True, None

    def _op_brk(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        self._charge(cpu, self.p.cost_syscall)
        return True, self.do_brk(proc, op[1])

    def _op_fork(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        # ("fork", child_program[, name])
        child = self.do_fork(cpu, proc, op[1], op[2] if len(op) > 2 else None)
        return True, child.pid

    def _op_exec(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        self.do_exec(cpu, proc, op[1])
        return True, None

    def _op_exit(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        self.do_exit(cpu, proc, cpu.clock)
        return True, None

    def _op_wait(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        """wait(): reap one exited child, or sleep until one exits; False if there are no children."""
        self._charge(cpu, self.p.cost_syscall)
        if proc.zombies:
            proc.zombies -= 1
            return True, True
        if not proc.children:
            return True, False
        proc.state = "blocked"
        proc.waiting_child = True
        return False, None

    def _op_read_file(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        # ("read_file", file, first_page, npages, user_buffer): page cache (disk on a miss) -> user copy
        file, first, n, buf = op[1], op[2], op[3], op[4]
        self._charge(cpu, self.p.cost_syscall)
        missing = [i for i in range(first, first + n) if (file.fid, i) not in self.page_cache]
        if missing:
            self._page_cache_fill(cpu, proc, file, missing, cpu.clock)
            return False, None
        vcpu = cpu.vcpu
        for k, i in enumerate(range(first, first + n)):
            gfn = self.page_cache[(file.fid, i)]
            self.page_cache.move_to_end((file.fid, i))
            self.kread(vcpu, gfn << 12)
            ok, _ = self._user_access(cpu, proc, buf + (k << 12), 8, "write", i, 0)    # copy_to_user
            if not ok:
                return False, None
            if proc.state == "zombie":
                return True, None
        return True, n

    def _op_write_file(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        # ("write_file", file, first_page, npages, user_buffer): copy_from_user into new page-cache pages
        file, first, n, buf = op[1], op[2], op[3], op[4]
        self._charge(cpu, self.p.cost_syscall)
        vcpu = cpu.vcpu
        self._reclaim_if_low(cpu)
        for k, i in enumerate(range(first, first + n)):
            ok, _ = self._user_access(cpu, proc, buf + (k << 12), 8, "read", None, 0)
            if not ok:
                return False, None
            key = (file.fid, i)
            gfn = self.page_cache.get(key)
            if gfn is None:
                gfn = self.frames.alloc()
                self.page_cache[key] = gfn
            self.kwrite(vcpu, gfn << 12, i)
        self.disk_request(cpu, cpu.clock, None)          # writeback, asynchronous
        return True, n

    def _op_sleep(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        # ("sleep", cycles): block, and be woken by a timer on this CPU
        if proc.sleeping:
            proc.sleeping = False
            return True, None
        proc.state = "blocked"
        proc.sleeping = True

        def wake(c: Cpu, t: int) -> int:
            if proc.state == "blocked":
                self._enqueue(proc, t, c)
            return 0
        self.at(cpu, cpu.clock + int(op[1]), wake)
        return False, None

    def _op_call(self, cpu: Cpu, proc: Process, op: Op, end: int) -> tuple[bool, Any]:
        """("call", fn, *args): a workload's kernel routine fn(os, cpu, proc, *args) -> (done, reply)."""
        return op[1](self, cpu, proc, *op[2:])

    _ops: ClassVar[dict[str, OpHandler]] = {
        "compute": _op_compute, "access": _op_access, "kaccess": _op_kaccess, "mmap": _op_mmap,
        "munmap": _op_munmap, "brk": _op_brk, "fork": _op_fork, "exec": _op_exec, "exit": _op_exit,
        "wait": _op_wait, "read_file": _op_read_file, "write_file": _op_write_file, "sleep": _op_sleep,
        "call": _op_call,
    }
