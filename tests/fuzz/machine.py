"""The stateful fuzzer: random interleavings of guest and VMM operations on two VMs sharing one host.

`machine_for(flavour, policy)` builds a hypothesis `RuleBasedStateMachine` whose first VM runs that
MMU flavour and MMIO policy; `initialize` draws the rest (guest paging mode, which VM starts near
the memslot-generation wrap, a small shadow-page quota or not, a host short of memory or not, the
initial page tables, the second VM's flavour / policy / mode, and VM A's MAXPHYADDR, TDP depth,
host huge pages, address spaces, MMIO generation width, EPT A/D, an aliased slot over its page
tables).  Every rule is one operation, on both the model and the reference (see world.py); after
every step `vm.audit()` must be clean for both VMs, every live TLB entry must map memory of its own
VM for a translation the guest may still use, guest memory must equal the reference, and
KVM_GET_DIRTY_LOG of every dirty-logged slot must hold every page the reference saw written since
the last call.
"""

from __future__ import annotations

import os

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import kvmmu
from kvmmu.kvm.mmu.spte import MmioGenLayout
from tests.fuzz import world as W

FLAVOURS = ("shadow", "ept", "npt", "ept-legacy", "npt-legacy")      # plain ept/npt: the TDP MMU
POLICIES = ("off", "zap", "generation")
MODES = ("4level", "4level", "5level", "pae", "32bit")
CONTROLS = ("wp", "nx", "smep", "smap", "pke", "pge", "pse")
ENTRY_KINDS = ("leaf", "leaf", "leaf", "leaf", "table", "table", "zero", "rsvd", "random")
MEMSLOT_OPS = ("create", "create", "delete", "delete", "move", "move", "flags", "resize", "toggle_ro")
SIZES = (1, 2, 4, 8, 16)

# VM A's parameters beyond flavour and policy (issue 15: attacks outside the old parameter space): the
# guest's and the host's MAXPHYADDR up to 52, 5-level TDP, host huge pages, one address space, a 3-bit
# MMIO generation (it wraps every few memslot changes), EPT without A/D bits.
HOST_MAXPHYADDRS = (46, 46, 39, 52)
VM_PARAMS = st.fixed_dictionaries({}, optional={
    "guest_maxphyaddr": st.sampled_from((36, 46, 48, 52)),
    "tdp_level": st.sampled_from((4, 5)),
    "host_hugepage_level": st.sampled_from((1, 2, 3)),
    "address_spaces": st.just(1),
    "mmio_gen_layout": st.just(MmioGenLayout(low_start=3, low_end=4, high_start=52, high_end=52)),
    "ept_ad": st.just(False),
})
worlds = st.sampled_from((0, 0, 0, 1))
# Protection keys (issue 19): any key, and PKRU values that deny key 0 or one other key as well as
# fully random ones, under every flavour.
pkeys = st.one_of(st.sampled_from((0, 0, 1, 2, 15)), st.integers(0, 15))
pkrus = st.one_of(st.sampled_from((0, 0x1, 0x2, 0x3, 0x4, 0x8, 0xC, 0x38, 0x55555554, 0xFFFFFFFC, 0xFFFFFFFF)),
                  st.integers(0, 15).map(lambda k: 1 << (2 * k)), st.integers(0, 15).map(lambda k: 2 << (2 * k)),
                  st.integers(0, 2 ** 32 - 1))
vcpus = st.sampled_from((0, 1, 1, 2, 2))
offsets = st.one_of(st.just(0), st.integers(0, 0xFFF), st.integers(0xFF0, 0xFFF), st.sampled_from((8, 0x800)))


def _linear_target(w: W.World, where: int, noncanonical: bool = True) -> int:
    """Mostly the linear pool; sometimes the direct map of the page tables, or a non-canonical address."""
    lay = w.lay
    if where < 176:
        return lay.gva_pool[where % len(lay.gva_pool)]
    extra = lay.direct_map + (lay.noncanonical if noncanonical else [])
    return extra[where % len(extra)]


def machine_for(flavour: str, policy: str) -> type[RuleBasedStateMachine]:
    """A state machine whose VM A runs `flavour` / `policy`."""

    class KvmmuMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.w: list[W.World] = []
            self.steps = 0

        @initialize(mode=st.sampled_from(MODES), seed=st.integers(0, 2 ** 32 - 1), near_wrap=st.booleans(),
                    quota=st.sampled_from((None, None, 64)), b_flavour=st.sampled_from(FLAVOURS),
                    b_policy=st.sampled_from(POLICIES), b_mode=st.sampled_from(MODES),
                    host_pages=st.sampled_from((None, None, None, 16, 48)),
                    host_bits=st.sampled_from(HOST_MAXPHYADDRS), params=VM_PARAMS, alias=st.booleans())
        def setup(self, mode: str, seed: int, near_wrap: bool, quota: int | None, b_flavour: str, b_policy: str,
                  b_mode: str, host_pages: int | None, host_bits: int = 46,
                  params: dict[str, object] | None = None, alias: bool = False) -> None:
            # host_pages: a host with only that many 4 KiB pages for guest RAM and KVM's tables, so
            # guest pages are swapped out (their sptes zapped by the mmu notifier) all the time.
            host = kvmmu.Host(host_bits) if host_pages is None else \
                kvmmu.Host(host_bits, memory_limit=4 << 20, reserved=(4 << 20) - (host_pages << 12))
            params = {k: v for k, v in (params or {}).items() if k != "ept_ad" or flavour == "ept"}
            self.w = [W.World("A", host, flavour, policy, mode, seed, near_wrap, quota, params, alias),
                      W.World("B", host, b_flavour, b_policy, b_mode, seed ^ 0x5A5A, not near_wrap, None)]

        def _step(self) -> bool:
            """Count a step (False only before setup, which hypothesis never lets happen)."""
            if not self.w:
                return False
            self.steps += 1
            W.COUNTERS.steps += 1
            return True

        # -- guest accesses ------------------------------------------------------------------------
        @rule(wi=worlds, vi=vcpus, where=st.integers(0, 255), off=offsets, size=st.sampled_from(SIZES),
              kind=st.sampled_from(("read", "read", "write", "write", "fetch")), cpl=st.sampled_from((0, 0, 3, 3, 1)),
              implicit=st.sampled_from((False, False, False, False, True)), value=st.integers(0, 2 ** 128 - 1))
        def access(self, wi: int, vi: int, where: int, off: int, size: int, kind: str, cpl: int, implicit: bool,
                   value: int) -> None:
            if not self._step():
                return
            w = self.w[wi]
            if vi == 0:
                gpas = w.frames() + [W.POOL + 0x1000 * i for i in range(W.NPOOL)]
                gpas = [g for g in gpas if g < 1 << 32]
                base = gpas[where % len(gpas)]
            else:
                base = _linear_target(w, where)
            gva = (base + off) & W.R.U64
            if (vi == 0 or w.mode in ("32bit", "pae")) and gva >> 32:
                gva &= 0xFFFF_FFFF
            w.access(vi, gva, size, kind, cpl, implicit, value)

        @rule(wi=worlds, writer=vcpus, k=st.integers(0, 2), where=st.integers(0, 255), level=st.integers(1, 5),
              kind=st.sampled_from(ENTRY_KINDS), frame=st.integers(0, 255), flags=st.integers(0, 0xFFF),
              pkey=pkeys, nx=st.sampled_from((False, False, False, True)),
              rsvd=st.integers(0, 7), raw=st.integers(0, 2 ** 64 - 1), part=st.sampled_from((0, 0, 0, 0, 1, 2, 3, 4)))
        def pte_write(self, wi: int, writer: int, k: int, where: int, level: int, kind: str, frame: int, flags: int,
                      pkey: int, nx: bool, rsvd: int, raw: int, part: int) -> None:
            if not self._step():
                return
            w = self.w[wi]
            gva = _linear_target(w, where, noncanonical=False)
            lvl = min(level, w.lay.levels)
            present = 1 if kind in ("leaf", "rsvd") and not flags & 0x800 else 0     # mostly present
            value = w.make_entry(lvl, kind, frame, flags | present, pkey, nx, rsvd, raw)
            w.pte_write(writer, k, gva, lvl, value, part)

        # Rules with many arguments sort last and are drawn least by hypothesis's simplest-first bias;
        # accesses and page-table writes get a second entry point to make up for it.
        @rule(wi=worlds, vi=vcpus, where=st.integers(0, 255), off=offsets, size=st.sampled_from(SIZES),
              kind=st.sampled_from(("read", "write", "fetch")), cpl=st.sampled_from((0, 3)),
              implicit=st.just(False), value=st.integers(0, 2 ** 128 - 1))
        def access_again(self, wi: int, vi: int, where: int, off: int, size: int, kind: str, cpl: int,
                         implicit: bool, value: int) -> None:
            self.access(wi, vi, where, off, size, kind, cpl, implicit, value)

        @rule(wi=worlds, back=st.integers(0, 15), other_vcpu=st.sampled_from((False, False, False, True)),
              off=st.sampled_from((0, 0, 4, 0xFF8, 0xFFC)), size=st.sampled_from(SIZES),
              kind=st.sampled_from(("read", "read", "write", "fetch")), cpl=st.sampled_from((0, 3)),
              value=st.integers(0, 2 ** 128 - 1))
        def access_repeat(self, wi: int, back: int, other_vcpu: bool, off: int, size: int, kind: str, cpl: int,
                          value: int) -> None:
            """Locality: touch a recently used page again (TLB hits, the MMIO fast path and cache)."""
            w = self.w[wi] if self.w else None
            if w is None or not w.recent:
                self.access(wi, 1, back, off, size, kind, cpl, False, value)
                return
            if not self._step():
                return
            vi, gva = w.recent[-1 - back % len(w.recent)]
            if other_vcpu and vi:
                vi = 3 - vi
            gva = (gva & ~0xFFF) | off
            if (vi == 0 or w.mode in ("32bit", "pae")) and gva >> 32:
                gva &= 0xFFFF_FFFF
            w.access(vi, gva, size, kind, cpl, False, value)

        @rule(wi=worlds, writer=vcpus, k=st.integers(0, 2), where=st.integers(0, 255), level=st.integers(1, 5),
              kind=st.sampled_from(ENTRY_KINDS), frame=st.integers(0, 255), flags=st.integers(0, 0xFFF),
              pkey=pkeys, nx=st.booleans(), rsvd=st.integers(0, 7), raw=st.integers(0, 2 ** 64 - 1),
              part=st.just(0))
        def pte_write_again(self, wi: int, writer: int, k: int, where: int, level: int, kind: str, frame: int,
                            flags: int, pkey: int, nx: bool, rsvd: int, raw: int, part: int) -> None:
            self.pte_write(wi, writer, k, where, level, kind, frame, flags, pkey, nx, rsvd, raw, part)

        @rule(wi=worlds, vi=st.sampled_from((1, 2)), op=st.sampled_from(("invlpg", "invlpg", "cr3")),
              where=st.integers(0, 255))
        def tlb_control(self, wi: int, vi: int, op: str, where: int) -> None:
            """INVLPG of a pool address, or MOV CR3 to one of the three address spaces."""
            if not self._step():
                return
            w = self.w[wi]
            if op == "cr3":
                w.write_cr3(vi, where % 3)
                return
            w.invlpg(vi, _linear_target(w, where))

        @rule(wi=worlds, vi=st.sampled_from((1, 2)), op=st.sampled_from(CONTROLS + ("pkru", "ac")),
              arg=st.integers(0, 7), pkru=pkrus)
        def cpu_control(self, wi: int, vi: int, op: str, arg: int, pkru: int = 0) -> None:
            """Toggle CR0.WP / CR4.SMEP/SMAP/PKE/PGE/PSE / EFER.NXE, WRPKRU, STAC/CLAC."""
            if not self._step():
                return
            w = self.w[wi]
            if op == "pkru":
                w.set_pkru(vi, pkru)
            elif op == "ac":
                w.set_ac(vi, bool(arg & 1))
            else:
                w.control(vi, op)

        # -- the VMM ----------------------------------------------------------------------------------
        @rule(wi=worlds, op=st.sampled_from(MEMSLOT_OPS), sid=st.sampled_from((1, 1, 2, 2, 3, 3, 0)),
              placement=st.integers(0, 7), flags=st.integers(0, 3))
        def memslot(self, wi: int, op: str, sid: int, placement: int, flags: int) -> None:
            if not self._step():
                return
            self.w[wi].memslot(op, sid, placement, flags)

        # -- invariants -----------------------------------------------------------------------------
        @invariant()
        def mmu_is_healthy(self) -> None:
            for w in self.w:
                w.audit()

        @invariant()
        def tlbs_stay_inside_their_vm(self) -> None:
            if len(self.w) == 2:
                self.w[0].check_tlbs(self.w[1])
                self.w[1].check_tlbs(self.w[0])

        @invariant()
        def dirty_log_complete(self) -> None:
            for w in self.w:
                w.check_dirty_log()

        @invariant()
        def memory_matches(self) -> None:
            for w in self.w:
                w.compare_memory(everything=self.steps % 8 == 0)

        def teardown(self) -> None:
            for w in self.w:
                w.compare_memory(everything=True)

    KvmmuMachine.__name__ = KvmmuMachine.__qualname__ = f"KvmmuMachine_{flavour}_{policy}"
    return KvmmuMachine


def profile() -> str:
    return os.environ.get("KVMMU_FUZZ_PROFILE", "fast")
