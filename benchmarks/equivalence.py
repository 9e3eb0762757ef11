"""Differential checks of the fast paths against the paths they shortcut (seeded, about 20 s).

    python -m benchmarks.equivalence [--cases N]

1. walker.probe / probe_ept against walk() on random tables (random present, R/W/U/NX, PS, A, D,
   reserved and protection-key bits; every mode the probes take; random accesses, AC and PKRU):
   whenever a probe answers, walk() on a copy of memory gives the same answer and writes nothing.
2. vcpu.run_accesses against a loop of vcpu.access on two identical VMs (shadow, EPT and NPT; TLB
   hits, fresh pages, write-protected pages, MMIO, guest faults, invalid arguments, CR3 switches,
   EFLAGS.AC and CPL changes): the same results, statistics, counters, memory and TLBs; a batch
   holding an op that access() refuses is refused whole, changing nothing.

tests/arch/test_fast_paths.py runs both at a smaller size in `make test`.

Fidelity is the test suite's job; this only guards the claim "a fast path answers only where it
answers what the general path would".
"""

from __future__ import annotations

import argparse
import copy
import random

import kvmmu
from kvmmu.arch.bits import EFER_LMA, X86_CR4_PKE, X86_CR4_SMAP, X86_CR4_SMEP, X86_EFLAGS_AC
from kvmmu.arch.modes import PagingContext
from kvmmu.arch.walker import walk
from kvmmu.errors import InvalidArgument
from kvmmu.guest.pagetables import NX, RW, US, GuestPageTables, P, vm_writer
from kvmmu.hw.cpu import check_access_args
from kvmmu.hw.memory import SparseMemory

from .micro import LONG_MODE, MMIO_GPA, MMIO_GVA

A, D, PS = 1 << 5, 1 << 6, 1 << 7


def _random_tables(rng: random.Random, ept: bool, levels: int) -> tuple[SparseMemory, int, list[int]]:
    """A small tree of tables with random entry bits; returns (memory, root, addresses to try)."""
    mem = SparseMemory(1 << 52)
    next_page = [0x10_0000]

    def new_table() -> int:
        t = next_page[0]
        next_page[0] += 0x1000
        return t

    root = new_table()
    addrs = []
    for _ in range(12):
        addr = rng.getrandbits(9 * levels + 12)
        if not ept and levels == 4 and rng.random() < 0.5:
            addr |= 0xFFFF8000_00000000 if addr >> 47 else 0
        table = root
        for level in range(levels, 0, -1):
            idx = (addr >> (12 + 9 * (level - 1))) & 511
            ea = table + 8 * idx
            old = mem.read(ea, 8)
            leaf = level == 1 or (level in (2, 3) and rng.random() < 0.15)
            if old and rng.random() < 0.7:
                if old & PS and level > 1 or level == 1:
                    break
                table = old & 0x000F_FFFF_FFFF_F000
                continue
            if ept:
                bits = rng.choice((7, 7, 7, 5, 3, 1, 6, 0, 4, 2)) | (rng.getrandbits(3) << 3 if leaf else 0)
                bits |= (1 << 8 if rng.random() < 0.8 else 0) | (1 << 9 if rng.random() < 0.6 else 0)
            else:
                bits = (P if rng.random() < 0.92 else 0) | (RW if rng.random() < 0.8 else 0)
                bits |= (US if rng.random() < 0.8 else 0) | (NX if rng.random() < 0.2 else 0)
                bits |= (A if rng.random() < 0.8 else 0) | (D if rng.random() < 0.6 else 0)
                bits |= rng.getrandbits(4) << 59 if rng.random() < 0.3 else 0
            if rng.random() < 0.03:
                bits |= 1 << rng.randrange(46, 52)          # a reserved physical-address bit
            if leaf:
                frame = rng.getrandbits(20) << (12 + 9 * (level - 1))
                mem.write(ea, 8, frame | bits | (PS if level > 1 else 0))
                break
            child = new_table()
            mem.write(ea, 8, child | bits)
            table = child
        addrs.append(addr)
    return mem, root, addrs


def _check_probe(rng: random.Random, cases: int) -> int:
    from kvmmu.arch.walker import PROBE_MISCONFIG, PROBE_WALK, probe, probe_ept
    answered = 0
    for case in range(cases):
        ept = rng.random() < 0.35
        levels = rng.choice((4, 5))
        mem, root, addrs = _random_tables(rng, ept, levels)
        if ept:
            ctx = PagingContext(f"ept{levels}", ept_ad=rng.random() < 0.7, ad_policy="hardware",
                                ept_execonly=rng.random() < 0.3)
        else:
            ctx = PagingContext(f"{levels}level", nxe=rng.random() < 0.8, wp=rng.random() < 0.7,
                                smep=rng.random() < 0.3, smap=rng.random() < 0.3, pke=rng.random() < 0.3,
                                ad_policy=rng.choice(("hardware", "kvm")))
        for addr in addrs:
            for _ in range(4):
                if ept:
                    access = rng.choice((0, 2, 16))
                    got = probe_ept(ctx, mem, root, addr, access)
                    if got == PROBE_WALK:
                        continue
                    ref = copy.deepcopy(mem.pages)
                    w = walk(ctx, mem, root, addr, access)
                    if got == PROBE_MISCONFIG:
                        assert w.fault == 49, (case, hex(addr), w)
                    else:
                        assert not w.fault and w.gpa == got, (case, hex(addr), w, hex(got))
                else:
                    access = rng.choice((0, 2, 4, 6, 16, 20)) | (1 << 48 if rng.random() < 0.1 else 0)
                    ac, pkru = rng.random() < 0.3, rng.getrandbits(32) if rng.random() < 0.5 else 0
                    got = probe(ctx, mem, root, addr, access, ac, pkru)
                    if got is None:
                        continue
                    ref = copy.deepcopy(mem.pages)
                    w = walk(ctx, mem, root, addr, access, ac=ac, pkru=pkru)
                    if isinstance(got, int):
                        assert w.fault == 14 and w.error_code == got, (case, hex(addr), w, hex(got))
                    else:
                        assert not w.fault and (w.gpa, w.pte_access, w.pkey) == got, (case, hex(addr), w, got)
                assert mem.pages == ref, f"case {case}: walk() wrote where the probe answered"
                answered += 1
    return answered


# -- run_accesses against access() -----------------------------------------------------------------
def _vm(mmu: str) -> tuple[kvmmu.VM, kvmmu.Vcpu, list[int]]:
    vm = kvmmu.VM(mmu=mmu, mmio_caching="generation")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=32 << 20)
    vm.mmio_handler = lambda exit_: 0x5A5A5A5A5A5A5A5A
    cr3s = []
    for p in range(2):
        pt = GuestPageTables("4level", *vm_writer(vm), pool=0x10_0000 + p * 0x10_0000)
        for i in range(48):
            flags = P | (RW if i % 7 else 0) | (US if i % 5 else 0) | (A | D if i % 3 == 0 else 0)
            pt.map(0x4000_0000 + i * 0x1000, 0x80_0000 + (p * 64 + i) * 0x1000, flags=flags)
        pt.map(MMIO_GVA + 0x10_0000, MMIO_GPA, flags=P | RW)
        cr3s.append(pt.cr3)
    vcpu = vm.create_vcpu()
    vcpu.set_sregs(cr3=cr3s[0], **LONG_MODE)
    return vm, vcpu, cr3s


def _ops(rng: random.Random, n: int) -> list[tuple]:
    ops: list[tuple] = []
    for _ in range(n):
        size = rng.choice((1, 2, 4, 8, 8, 16, 3))
        gva = 0x4000_0000 + rng.randrange(52) * 0x1000 + rng.randrange(0x1000)
        if rng.random() < 0.05:
            gva = MMIO_GVA + 0x10_0000 + rng.randrange(16)
        elif rng.random() < 0.03:
            gva = 0x1_0000_0000 + rng.randrange(4) * 0x1000 + rng.randrange(0x1000)   # beyond 32 bits
        kind = rng.choice(("read", "write", "fetch", "read", "write", "bogus" if rng.random() < 0.01 else "read"))
        value = None
        if kind == "write":
            value = rng.getrandbits(8 * size) if rng.random() < 0.97 else -1
        op: tuple = (gva, size, kind, value)
        r = rng.random()
        if r < 0.3:
            op = op + (rng.choice((0, 3, 3, None)),)
        elif r < 0.35:
            op = op + (0, True)
        elif r < 0.4 and value is None:
            op = op[:3]
        ops.append(op)
    return ops


def _state(vm: kvmmu.VM) -> tuple:
    v = vm.vcpus[0]
    return (dict(vm.stats), dict(v.stats), dict(v.counters), dict(v.cpu.tlb), v.cpl, v.cr2,
            {k: bytes(p) for k, p in vm.host.mem.pages.items()}, [repr(e) for e in vm.mmio_log])


def _refusal(v: kvmmu.Vcpu, op: tuple) -> tuple[int, str] | None:
    """How access(*op) refuses op (it then does nothing): (0, error) for a bad argument, (1, error)
    for an address too wide for the vCPU's mode; None if it would run it."""
    try:
        check_access_args(*op)
        if not op[0] >> 32 or v.efer & EFER_LMA:
            return None
        kind = 1
    except InvalidArgument:
        kind = 0
    try:
        v.access(*op)
    except InvalidArgument as e:
        return kind, str(e)
    raise AssertionError(f"access{op} was not refused")


def _check_batches(rng: random.Random, rounds: int, ops_per_step: int = 300) -> int:
    done = 0
    for r in range(rounds):
        mmu = ("shadow", "ept", "npt")[r % 3]
        (vm1, v1, cr3s), (vm2, v2, _) = _vm(mmu), _vm(mmu)
        for step in range(7):
            ops = _ops(rng, ops_per_step)
            if step % 2:
                cpl = rng.choice((0, 3))
                for v in (v1, v2):
                    v.rflags ^= X86_EFLAGS_AC
                    v.cpl = cpl
                    v.write_cr3(cr3s[step % 2])
            if step == 4:
                for v in (v1, v2):
                    v.set_sregs(cr4=LONG_MODE["cr4"] | X86_CR4_SMEP | X86_CR4_SMAP | X86_CR4_PKE, pkru=0x0C)
            if step == 5:
                for v in (v1, v2):                  # paging off: gva = gpa, 32-bit addresses
                    v.set_sregs(cr0=LONG_MODE["cr0"] & ~(1 << 31), cr4=0, efer=0)
            # run_accesses refuses a batch with an op that access() refuses before it runs any op
            # (the first bad argument names the error, else the first address too wide for the
            # mode); without them it runs the ops as access() does.
            refusals = [_refusal(v2, op) for op in ops]
            first = min((e for e in refusals if e is not None), key=lambda e: e[0], default=(0, None))[1]
            if first is not None:
                before = _state(vm1)
                try:
                    v1.run_accesses(ops, [])
                    raise AssertionError((r, step, "a batch with a bad op ran"))
                except InvalidArgument as e:
                    assert str(e) == first, (r, step, str(e), first)
                assert _state(vm1) == before == _state(vm2), (r, step, "a refused batch changed something")
                ops = [op for op, e in zip(ops, refusals, strict=True) if e is None]
            i = 0
            while i < len(ops):
                values1: list = []
                try:
                    stop, bad = v1.run_accesses(ops, values1, start=i)
                    err1 = None
                except InvalidArgument as e:
                    stop, bad, err1 = None, None, str(e)
                values2: list = []
                err2 = None
                j = i
                bad2 = None
                while j < len(ops):
                    try:
                        res = v2.access(*ops[j])
                    except InvalidArgument as e:
                        err2 = str(e)
                        break
                    if res.fault is not None or res.l1_exit is not None:
                        bad2 = res
                        break
                    values2.append(res.value)
                    j += 1
                assert err1 == err2, (r, step, i, err1, err2)
                assert values1 == values2, (r, step, i)
                if err1 is None:
                    assert stop == j and repr(bad) == repr(bad2), (r, step, stop, j, bad, bad2)
                assert _state(vm1) == _state(vm2), (r, step, i)
                done += j - i
                i = j + 1
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    n = _check_probe(rng, args.cases)
    print(f"probe/probe_ept agree with walk() on {n:,} answered walks")
    n = _check_batches(rng, 9)
    print(f"run_accesses agrees with access() on {n:,} accesses")


if __name__ == "__main__":
    main()
