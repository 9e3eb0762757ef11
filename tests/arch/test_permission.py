"""The one access rule (arch/permission.py) against the independent oracle, and every fast check
against the rule: the per-context tables, walk(), probe(), probe_ept() and the TLB-hit paths.

Exhaustive over the bits the rule reads: the access (W/U/F, implicit), the translation's U/W/X,
CR0.WP, EFER.NXE, CR4.SMEP/SMAP/PKE, EFLAGS.AC and the key's PKRU.AD/WD (docs/spec/x86-access.md
§2.4 and §5).  The oracle (tests/oracle/access_rules.py) states the rules in its own shape.
"""

from __future__ import annotations

from itertools import product
from types import SimpleNamespace

import pytest

from kvmmu.arch import PagingContext, walk
from kvmmu.arch.bits import (
    PFERR_FETCH_MASK,
    PFERR_IMPLICIT_ACCESS,
    PFERR_PK_MASK,
    PFERR_PRESENT_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
    X86_EFLAGS_AC,
)
from kvmmu.arch.permission import access_fault, ept_violation, permission_fault
from kvmmu.arch.walker import PROBE_MISCONFIG, PROBE_WALK, probe, probe_ept_rights
from kvmmu.hw import tdp
from kvmmu.hw.cpu import TLB_READ, Cpu, DecodedAccesses
from kvmmu.hw.host import Host
from kvmmu.hw.memory import SparseMemory
from kvmmu.hw.vmcs import TdpControls
from tests.oracle import access_rules as oracle

W, U, F, IMPLICIT = PFERR_WRITE_MASK, PFERR_USER_MASK, PFERR_FETCH_MASK, PFERR_IMPLICIT_ACCESS
# The accesses there are: read/write/fetch at CPL3 or CPL<3, implicit supervisor reads and writes.
ACCESSES = (0, W, F, U, U | W, U | F, IMPLICIT, IMPLICIT | W)
BOOLS = (False, True)


def _oracle(pfec: int, acc: int, *, wp: bool, nx: bool, smep: bool, smap: bool, ac: bool, pkeys: bool,
            pkru_bits: int) -> int:
    deny, pk = oracle.rights(cpl3=bool(pfec & U), write=bool(pfec & W), fetch=bool(pfec & F),
                             implicit=bool(pfec & IMPLICIT), user_page=bool(acc & 4), writable=bool(acc & 2),
                             executable=bool(acc & 1) or not nx, wp=wp, smep=smep, smap=smap, ac=ac,
                             keys_on=pkeys, key_rights=pkru_bits)
    return (PFERR_PRESENT_MASK if deny or pk else 0) | (PFERR_PK_MASK if pk else 0)


def test_rule_matches_the_oracle_on_every_combination() -> None:
    n = 0
    for pfec, acc, wp, nx, smep, smap, ac, pkeys, pkru_bits in product(
            ACCESSES, range(8), BOOLS, BOOLS, BOOLS, BOOLS, BOOLS, BOOLS, range(4)):
        kw = dict(wp=wp, nx=nx, smep=smep, smap=smap, ac=ac, pkeys=pkeys, pkru_bits=pkru_bits)
        assert access_fault(pfec, acc, **kw) == _oracle(pfec, acc, **kw), (hex(pfec), acc, kw)
        n += 1
    assert n == 8 * 8 * 2 ** 6 * 4


def test_ept_rule() -> None:
    # SDM Vol. 3C 29.3.3.2: reads need R, writes W, fetches X (rights as R=1, W=2, X=4).
    for rights in range(8):
        assert ept_violation(0, rights) == (not rights & 1)
        assert ept_violation(W, rights) == (not rights & 2)
        assert ept_violation(F, rights) == (not rights & 4)


CONTROLS = list(product(BOOLS, BOOLS, BOOLS, BOOLS, BOOLS))      # WP, NXE, SMEP, SMAP, PKE


@pytest.mark.parametrize("mode", ["32bit", "pae", "4level", "5level", "npt4"])
def test_context_tables_follow_the_rule(mode: str) -> None:
    """permission_fault (the tables) == access_fault for every access, translation and PKRU."""
    for wp, nxe, smep, smap, pke in CONTROLS:
        ctx = PagingContext(mode, wp=wp, nxe=nxe, smep=smep, smap=smap, pke=pke)
        nx, pkeys = nxe and mode != "32bit", pke and mode in ("4level", "5level")
        for pfec, acc, ac, pkru_bits in product(ACCESSES, range(8), BOOLS, range(4)):
            for pkey in (0, 9):
                got = permission_fault(ctx, pfec, acc, ac, pkru_bits << (2 * pkey), pkey)
                want = access_fault(pfec, acc, wp=wp, nx=nx, smep=smep, smap=smap, ac=ac, pkeys=pkeys,
                                    pkru_bits=pkru_bits)
                assert got == want, (ctx, hex(pfec), acc, ac, pkru_bits, pkey)


# -- walk() and probe() on a real table, every leaf/upper-level U/W/XD shape -----------------------
A, D, PS, XD = 1 << 5, 1 << 6, 1 << 7, 1 << 63
GVA = 0xFFFF_8000_4020_3000


def _tables(levels: int, pte_bits: int, pde_bits: int, key: int) -> tuple[SparseMemory, int]:
    """A 4 KiB mapping of GVA with every entry present, accessed and dirty (so probe() answers), the
    PDE and PTE rights given as (U, W, XD) bits 0-2."""
    mem = SparseMemory()
    root = table = 0x10_0000
    for level in range(levels, 0, -1):
        bits = {1: pte_bits, 2: pde_bits}.get(level, 3)
        rights = 1 | (4 if bits & 1 else 0) | (2 if bits & 2 else 0) | (XD if bits & 4 else 0) | A | D
        nxt = table + 0x1000 if level > 1 else 0x4000_0000
        mem.write(table + 8 * ((GVA >> (12 + 9 * (level - 1))) & 511), 8, nxt | rights | (key << 59))
        table = nxt
    return mem, root


@pytest.mark.parametrize("levels", [4, 5])
def test_walk_and_probe_follow_the_rule(levels: int) -> None:
    for pte_bits, pde_bits in product(range(8), range(8)):
        mem, root = _tables(levels, pte_bits, pde_bits, key=1)
        for wp, nxe, smep, smap, pke in CONTROLS:
            ctx = PagingContext(f"{levels}level", wp=wp, nxe=nxe, smep=smep, smap=smap, pke=pke)
            xd = (pte_bits | pde_bits) & 4
            if xd and not nxe:
                continue                                    # XD is then a reserved bit
            acc = (4 if pte_bits & pde_bits & 1 else 0) | (2 if pte_bits & pde_bits & 2 else 0) | (0 if xd else 1)
            for pfec, ac, pkru_bits in product(ACCESSES, BOOLS, range(4) if pke else (0,)):
                pkru = pkru_bits << 2                       # key 1
                want = access_fault(pfec, acc, wp=wp, nx=nxe, smep=smep, smap=smap, ac=ac, pkeys=pke,
                                    pkru_bits=pkru_bits)
                w = walk(ctx, mem, root, GVA, pfec, ac=ac, pkru=pkru)
                p = probe(ctx, mem, root, GVA, pfec, ac, pkru)
                where = (levels, pte_bits, pde_bits, ctx, hex(pfec), ac, pkru_bits)
                if want:
                    assert w.fault == 14 and w.error_code & (PFERR_PRESENT_MASK | PFERR_PK_MASK) == want, where
                    assert p == w.error_code, where
                else:
                    assert not w.fault and w.pte_access == acc, where
                    assert p == (w.gpa, acc, 1 if pke else 0), where


def _ept_tables(leaf: int, upper: int) -> tuple[SparseMemory, int]:
    mem = SparseMemory()
    root = table = 0x10_0000
    for level in range(4, 0, -1):
        rights = (leaf | 6 << 3 if level == 1 else upper) | 1 << 8 | 1 << 9      # A and D set
        nxt = table + 0x1000 if level > 1 else 0x4000_0000
        mem.write(table + 8 * ((0x1234_5000 >> (12 + 9 * (level - 1))) & 511), 8, nxt | rights)
        table = nxt
    return mem, root


def test_walk_and_probe_ept_follow_the_ept_rule() -> None:
    for leaf, upper, execonly in product(range(1, 8), range(1, 8), BOOLS):
        ctx = PagingContext("ept4", ept_ad=True, ad_policy="hardware", ept_execonly=execonly)
        mem, root = _ept_tables(leaf, upper)
        misconfig = leaf in (2, 6) or upper in (2, 6) or (not execonly and 4 in (leaf, upper))
        for access in (0, W, F):
            hpa, rights = probe_ept_rights(ctx, mem, root, 0x1234_5000, access)
            w = walk(ctx, mem, root, 0x1234_5000, access)
            if misconfig:
                assert hpa == PROBE_MISCONFIG and w.fault == 49
            elif ept_violation(access, leaf & upper):
                assert hpa == PROBE_WALK and w.fault == 48, (leaf, upper, access)
            else:
                assert hpa == w.gpa == 0x4000_0000 and rights == leaf & upper and not w.fault


# -- the TLB-hit paths: each decides as the rule, or leaves the access to translate() -----------------
def _fake_cpu(cls: type, ctx: PagingContext) -> Cpu | tdp.TdpCpu:
    """A CPU whose VMCS holds `ctx`, the TLB empty, KVM's tables (the shadow root, the EPT root) empty,
    so that any miss exits.  The real classes: the hot ones may be compiled (kvmmu._native), and a
    compiled class takes no Python subclass."""
    paging = SimpleNamespace(hw_ctx=ctx, cpu_role=ctx, root_hpa=0x20_0000, root_level=4,
                             hw_guest_ctx=PagingContext("nonpaging"))
    counters = {"tlb_hits": 0, "hw_walks": 0}
    cpu = tdp.TdpCpu(Host(), counters, TdpControls(ept=True, level=4, ept_ad=False)) if cls is tdp.TdpCpu \
        else Cpu(SparseMemory(1 << 32), counters)
    cpu.load_vmcs(SimpleNamespace(rflags=2, pkru=0, ac=False), paging)
    return cpu


@pytest.mark.parametrize("cls", [Cpu, tdp.TdpCpu])
def test_tlb_hits_follow_the_rule(cls: type) -> None:
    gva, page = 0x7000_1000, 0x5000
    for wp, nxe, smep, smap, pke in CONTROLS:
        ctx = PagingContext("4level", wp=wp, nxe=nxe, smep=smep, smap=smap, pke=pke)
        cpu = _fake_cpu(cls, ctx)
        vcpu = cpu.regs
        for acc, kinds, ac, pkru_bits in product(range(8), (TLB_READ | F, TLB_READ | F | W, TLB_READ), BOOLS,
                                                 range(4) if pke else (0,)):
            vcpu.rflags, vcpu.ac, vcpu.pkru = 2 | (X86_EFLAGS_AC if ac else 0), ac, pkru_bits << 6   # key 3
            entry = (page, acc, kinds, 3)
            for pfec in ACCESSES:
                kind_ok = bool(kinds & (pfec & (W | F) or TLB_READ))
                allowed = kind_ok and not access_fault(pfec, acc, wp=wp, nx=nxe, smep=smep, smap=smap, ac=ac,
                                                       pkeys=pke, pkru_bits=pkru_bits)
                # The fast paths leave every access that a key could deny to translate().
                fast = allowed and not (pke and acc & 4 and not pfec & F)
                where = (ctx, acc, kinds, ac, pkru_bits, hex(pfec))
                cpu.tlb[gva >> 12] = entry
                hits = cpu.counters["tlb_hits"]
                hpa = cpu.translate(gva | 0x18, pfec)[0]
                assert (hpa == page | 0x18) == allowed and cpu.counters["tlb_hits"] == hits + allowed, where
                cpu.tlb[gva >> 12] = entry
                assert (cpu.tlb_hit(gva | 0x18, pfec) == page | 0x18) == fast, where
                if pfec & IMPLICIT:
                    continue                           # the batch paths take explicit accesses only
                cpu.tlb[gva >> 12] = entry
                assert (cpu.tlb_access(gva | 0x18, 8, pfec, 0) >= 0) == fast, where
                kind = "write" if pfec & W else "fetch" if pfec & F else "read"
                cpu.tlb[gva >> 12] = entry
                batch = DecodedAccesses([(gva | 0x18, 8, kind, 0 if kind == "write" else None)])
                assert (cpu.run_decoded(batch, 0, 1, 3 if pfec & U else 0, None) == 1) == fast, where
