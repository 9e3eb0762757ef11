"""One VM under fuzzing, side by side with its architectural reference.

A `World` owns a kvmmu VM (three vCPUs: a "firmware" vCPU with paging off, which can store to any
guest-physical address below 4 GiB, and two paging vCPUs), the guest's page tables in a pool of
table pages inside memslot 0, and a `Reference`.  Every operation is done on both; every access
result must be one the reference allows, and guest memory must match the reference afterwards.

Guest-physical layout:
    slot 0   [0, 2 MiB)        table pool at POOL, kernel data pages at KDATA
    slot 1   16 pages          \\
    slot 2   2 MiB             > data slots, created / deleted / moved among PLACEMENTS
    slot 3   4 pages           /
    MMIO     no memslot        MMIO_GPAS (and anything a slot has left)
Linear layout: a pool of linear pages (`gva_pool`) whose tables share entries at every level, plus a
supervisor "direct map" of the table pool (TBASE + gpa) through which paging vCPUs write their tables.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import kvmmu
from tests.fuzz import reference as R

POOL = 0x20000
NPOOL = 64
KDATA = 0x100000
NKDATA = 8
SLOT0_SIZE = 2 << 20
DATA_SLOTS = {1: 16 << 12, 2: 2 << 20, 3: 4 << 12}
PLACEMENTS = (0x200000, 0x400000, 0x800000, 0x4000_0000, 0x1_0000_0000)
MMIO_GPAS = (0xD000_0000, 0xD000_1000, 0xFEE0_0000, 0x3000_0000)
LOG_DIRTY, READONLY = 1, 2

CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_PGE, CR4_LA57 = 1 << 4, 1 << 5, 1 << 7, 1 << 12
CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 20, 1 << 21, 1 << 22
EFER_LME, EFER_NX = 1 << 8, 1 << 11
RFLAGS_AC = 1 << 18
_REQ_FLUSHES = ("KVM_REQ_TLB_FLUSH", "KVM_REQ_TLB_FLUSH_GUEST", "KVM_REQ_TLB_FLUSH_CURRENT",
                "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS")


class Mismatch(AssertionError):
    """The model did something the architecture does not allow."""


@dataclass
class Counters:
    """What the fuzzer executed: rule steps; model operations (guest accesses, INVLPG, control-register
    writes, memslot ioctls, vm.audit() calls); guest accesses among them."""

    steps: int = 0
    ops: int = 0
    accesses: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def saw(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1


COUNTERS = Counters()


def sext(addr: int, bits: int) -> int:
    addr &= (1 << bits) - 1
    if addr >> (bits - 1):
        addr |= R.U64 & ~((1 << bits) - 1)
    return addr


class Layout:
    """Where things are in one paging mode: index arithmetic, the linear pool, the direct map."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.esize = 4 if mode == "32bit" else 8
        self.levels = R.MODE_LEVELS[mode]
        if mode == "32bit":
            self.shifts = {2: 22, 1: 12}
            self.imask = 0x3FF
            self.tbase = 0xC000_0000
            pool = [0x0000_0000 + 0x1000 * i for i in (0, 1, 2, 8, 9, 1023)]
            pool += [0x0040_0000, 0x0040_1000, 0x8000_0000, 0x8000_5000, 0xC040_0000, 0xC040_1000, 0xFFFF_F000]
            self.noncanonical: list[int] = []
        elif mode == "pae":
            self.shifts = {3: 30, 2: 21, 1: 12}
            self.imask = 0x1FF
            self.tbase = 0xC000_0000
            pool = [0x1000 * i for i in (0, 1, 2, 8, 9, 511)]
            pool += [0x0020_0000, 0x0020_1000, 0x4000_0000, 0x4000_5000, 0x8000_0000, 0xC020_0000,
                     0xC020_1000, 0xFFFF_F000]
            self.noncanonical = []
        else:
            top = 5 if mode == "5level" else 4
            bitsz = 57 if top == 5 else 48
            self.shifts = {5: 48, 4: 39, 3: 30, 2: 21, 1: 12}
            self.imask = 0x1FF

            def la(*idx: int) -> int:
                v = 0
                for lvl, i in zip(range(top, 0, -1), idx, strict=True):
                    v |= i << self.shifts[lvl]
                return sext(v, bitsz)

            pre = (0,) if top == 5 else ()
            pool = [la(*pre, 0, 0, 0, i) for i in (0, 1, 2, 8, 9, 511)]
            pool += [la(*pre, 0, 0, 1, 0), la(*pre, 0, 0, 1, 1), la(*pre, 0, 1, 0, 0), la(*pre, 0, 1, 0, 5),
                     la(*pre, 1, 0, 0, 0), la(*pre, 256, 0, 0, 0), la(*pre, 256, 0, 0, 1)]
            if top == 5:
                pool += [la(1, 0, 0, 0, 0), la(511, 511, 511, 511, 511), la(255, 511, 511, 511, 511)]
                self.tbase = la(300, 0, 0, 0, 0)
                self.noncanonical = [0x0100_0000_0000_0000, 0xFE00_0000_0000_0000]
            else:
                pool += [la(511, 511, 511, 511), la(255, 511, 511, 511)]
                self.tbase = la(300, 0, 0, 0)
                self.noncanonical = [0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_F000]
        self.gva_pool = pool
        self.direct_map = [self.tbase + POOL + 0x1000 * i for i in range(NPOOL)]

    def index(self, gva: int, level: int) -> int:
        if self.mode == "pae" and level == 3:
            return (gva >> 30) & 3
        return (gva >> self.shifts[level]) & self.imask

    def frame_mask(self) -> int:
        return 0xFFFFF000 if self.esize == 4 else R.bits(51, 12)

    def large_levels(self) -> tuple[int, ...]:
        return {"32bit": (2,), "pae": (2,), "4level": (2, 3), "5level": (2, 3)}[self.mode]


def large_size(mode: str, level: int) -> int:
    if mode == "32bit":
        return R.MiB4
    return R.MiB2 if level == 2 else R.GiB1


class World:
    """One VM and its reference."""

    def __init__(self, name: str, host: kvmmu.Host, flavour: str, policy: str, mode: str, seed: int,
                 near_wrap: bool, quota: int | None, params: dict[str, object] | None = None,
                 alias: bool = False) -> None:
        """`params`: more VM() keyword arguments (MAXPHYADDR, TDP depth, host huge pages, ...);
        `alias`: slot 3, when created, maps the first pages of the table pool (two gpas, one host page)."""
        self.name = name
        self.flavour, self.policy, self.mode = flavour, policy, mode
        kw: dict[str, object] = dict(params or {})
        if near_wrap:
            kw["initial_generation"] = (1 << 19) - 8
        if quota is not None:
            kw["max_mmu_pages"] = quota
        self.params = kw
        # "ept-legacy" / "npt-legacy": EPT/NPT on the legacy MMU (kvm.tdp_mmu=N); plain names use the TDP MMU.
        mmu, _, legacy = flavour.partition("-")
        self.vm = kvmmu.VM(mmu=mmu, mmio_caching=policy, host=host, tdp_mmu=not legacy, **kw)  # type: ignore[arg-type]
        self.vm.mmio_handler = self._vmm_mmio
        self.maxphyaddr = self.vm.guest_maxphyaddr
        self.ref = R.Reference(self.maxphyaddr, "kvm" if flavour == "shadow" else "hardware")
        self.lay = Layout(mode)
        self.rng = random.Random(seed)
        self.hvas: dict[int, int] = {}
        self.log: list[str] = []
        self.recent: list[tuple[int, int]] = []      # (vcpu, gva) of recent accesses: for locality
        # Dirty pages (index in slot) the reference saw written since the last KVM_GET_DIRTY_LOG.
        self.dirty: dict[int, set[int]] = {}
        self._create_slot(0, 0, SLOT0_SIZE, 0)
        self._create_slot(1, PLACEMENTS[0], DATA_SLOTS[1], 0)
        self._create_slot(2, PLACEMENTS[1], DATA_SLOTS[2], 0)
        if alias:
            self.hvas[3] = self.hvas[0] + POOL
        self.free_tables = [POOL + 0x1000 * i for i in range(NPOOL)]
        self.roots: list[int] = []
        self._build_tables()
        self.vcpus = [self.vm.create_vcpu() for _ in range(3)]
        self.ref.vcpus = [R.VcpuRef(f"{name}.vcpu{i}") for i in range(3)]
        self._setup_vcpus()
        self.tracked = sorted(set(self.lay.gva_pool + self.lay.direct_map))
        self.ref.speculative_fill(self.tracked)

    # -- the VMM ----------------------------------------------------------------------------------
    @staticmethod
    def _vmm_mmio(exit_: kvmmu.MmioExit) -> int | None:
        return None if exit_.is_write else R.mmio_read_value(exit_.phys_addr, exit_.len)

    def _create_slot(self, sid: int, gpa: int, size: int, flags: int) -> None:
        if sid in self.hvas:
            self.vm.set_user_memory_region(sid, gpa, size, flags, userspace_addr=self.hvas[sid])
        else:
            self.vm.set_user_memory_region(sid, gpa, size, flags)
            self.hvas[sid] = self.vm.memslots.slot(sid).userspace_addr
        self.ref.phys.slots[sid] = R.Slot(sid, gpa, size, flags, self.hvas[sid])

    def vmm_write(self, gpa: int, size: int, value: int) -> None:
        """Setup only (before any vCPU ran): write through the VMM's mapping, on both sides."""
        data = value.to_bytes(size, "little")
        self.vm.write_phys(gpa, data)
        self.ref.phys.write(gpa, data)

    # -- initial page tables --------------------------------------------------------------------------
    def _alloc(self) -> int | None:
        return self.free_tables.pop(0) if len(self.free_tables) > 8 else None

    def _read(self, gpa: int) -> int:
        return self.ref.phys.read_int(gpa, self.lay.esize) or 0

    def _upper_flags(self, level: int, rng: random.Random) -> int:
        if self.mode == "pae" and level == 3:
            return R.P
        f = R.P | R.RW | R.US
        if rng.random() < 0.15:
            f &= ~R.RW
        if rng.random() < 0.1:
            f &= ~R.US
        if rng.random() < 0.3:
            f |= R.A
        if self.mode != "32bit" and rng.random() < 0.05:
            f |= R.XD
        return f

    def _ensure(self, root: int, gva: int, level: int, rng: random.Random, share: dict | None = None) -> int | None:
        """The gpa of the entry mapping gva at `level`, creating tables above it."""
        lay = self.lay
        table = root
        for lvl in range(lay.levels, level, -1):
            egpa = table + lay.esize * lay.index(gva, lvl)
            entry = self._read(egpa)
            large = entry & R.PS and lvl in lay.large_levels()
            if not entry & R.P or large:
                key = (lvl, gva >> lay.shifts[lvl] if lvl in lay.shifts else 0)
                child = share.get(key) if share is not None else None
                if child is None:
                    child = self._alloc()
                    if child is None:
                        return None
                    if share is not None:
                        share[key] = child
                entry = child | self._upper_flags(lvl, rng)
                self.vmm_write(egpa, lay.esize, entry)
            table = entry & lay.frame_mask()
        return table + lay.esize * lay.index(gva, level)

    def leaf_value(self, frame: int, level: int, flags: int, pkey: int = 0) -> int:
        if level > 1:
            flags |= R.PS
            if self.mode == "32bit":
                return (frame & 0xFFC00000) | (((frame >> 32) & 0xF) << 13) | flags
        v = frame | flags
        if self.mode in ("4level", "5level"):
            v |= pkey << 59
        return v

    def _build_tables(self) -> None:
        rng = self.rng
        lay = self.lay
        nas = 3
        self.roots = [self.free_tables.pop(0) for _ in range(nas)]
        kshare: dict = {}
        ushare: dict = {}
        for k, root in enumerate(self.roots):
            for p in range(NPOOL):               # the direct map of the table pool: shared, supervisor
                gpa = POOL + 0x1000 * p
                egpa = self._ensure(root, lay.tbase + gpa, 1, rng, kshare)
                if egpa is not None and not self._read(egpa):
                    self.vmm_write(egpa, lay.esize, gpa | R.P | R.RW | R.A | R.D)
            share = ushare if k == 0 or rng.random() < 0.6 else None
            for gva in lay.gva_pool:
                r = rng.random()
                if r < 0.15:
                    continue
                if r < 0.25:
                    level = rng.choice(lay.large_levels())
                    if level == 3 and self.mode in ("32bit", "pae"):
                        continue
                    size = large_size(self.mode, level)
                    frame = rng.choice([0, 0x200000, 0x400000, 0xC000_0000, 0xD000_0000]) & ~(size - 1)
                    egpa = self._ensure(root, gva, level, rng, share)
                    if egpa is None:
                        continue
                    flags = R.P | R.RW | R.US | (R.A if rng.random() < 0.5 else 0)
                    self.vmm_write(egpa, lay.esize, self.leaf_value(frame, level, flags))
                    continue
                egpa = self._ensure(root, gva, 1, rng, share)
                if egpa is None or (self._read(egpa) & R.P and share is not None and k):
                    continue
                flags = R.P | R.RW | R.US
                for bit, prob in ((R.RW, 0.2), (R.US, 0.15)):
                    if rng.random() < prob:
                        flags &= ~bit
                if rng.random() < 0.4:
                    flags |= R.A
                if rng.random() < 0.2:
                    flags |= R.D
                self.vmm_write(egpa, lay.esize, self.leaf_value(self.random_frame(rng), 1, flags,
                                                                rng.choice((0, 0, 1, 2))))

    def random_frame(self, rng: random.Random) -> int:
        r = rng.random()
        if r < 0.35:
            return KDATA + 0x1000 * rng.randrange(NKDATA)
        if r < 0.6:
            sid = rng.choice((1, 2, 3))
            places = [p for p in PLACEMENTS if self.mode != "32bit" or p < 1 << 32]
            return rng.choice(places) + 0x1000 * rng.randrange(min(16, DATA_SLOTS[sid] >> 12))
        if r < 0.8:
            return rng.choice(MMIO_GPAS)
        return POOL + 0x1000 * rng.randrange(NPOOL)

    def _setup_vcpus(self) -> None:
        rng = self.rng
        fw = self.vcpus[0]
        fw.set_sregs(cr0=CR0_PE, cr3=0, cr4=0, efer=0)
        self.ref.vcpus[0].regs = R.Regs(mode="nonpaging")
        for i in (1, 2):
            v = self.vcpus[i]
            regs = R.Regs(mode=self.mode, cr3=self.roots[i - 1], wp=rng.random() < 0.7)
            cr4 = 0
            efer = 0
            if self.mode in ("pae", "4level", "5level"):
                cr4 |= CR4_PAE
                regs.nxe = rng.random() < 0.8
                efer |= EFER_NX if regs.nxe else 0
            if self.mode in ("4level", "5level"):
                efer |= EFER_LME
            if self.mode == "5level":
                cr4 |= CR4_LA57
            if self.mode == "32bit":
                regs.pse = rng.random() < 0.7
                cr4 |= CR4_PSE if regs.pse else 0
            if self.mode == "pae":
                regs.pdptrs = tuple(self._read_entry8(regs.cr3 + 8 * j) for j in range(4))
            v.set_sregs(cr0=CR0_PG | CR0_PE | (CR0_WP if regs.wp else 0), cr3=regs.cr3, cr4=cr4, efer=efer)
            self.ref.vcpus[i].regs = regs

    def _read_entry8(self, gpa: int) -> int:
        return self.ref.phys.read_int(gpa, 8) or 0

    # -- checks ---------------------------------------------------------------------------------------
    def fail(self, msg: str) -> None:
        tail = "\n  ".join(self.log[-12:])
        raise Mismatch(f"[{self.name}: {self.flavour}/{self.policy}/{self.mode} {self.params} "
                       f"aliased hvas {self.hvas}] {msg}\n  recent steps:\n  {tail}")

    def note(self, msg: str) -> None:
        self.log.append(msg)
        if len(self.log) > 64:
            del self.log[:32]

    def model_bytes(self, gpa: int, n: int) -> bytes | None:
        if self.ref.phys.slot_at(gpa) is None:
            return None
        try:
            return self.vm.read_phys(gpa, n)
        except kvmmu.KvmmuError as e:
            self.fail(f"vm.read_phys({gpa:#x}, {n}) raised {e!r} for a gpa the reference says is backed")
        return None

    def compare_memory(self, everything: bool = False) -> None:
        """Guest memory (the VMM's view) equals the reference: the table pool always, all slots if asked."""
        ranges = [(POOL, NPOOL << 12), (KDATA, NKDATA << 12)]
        if everything:
            ranges = [(s.gpa, s.size) for s in self.ref.phys.slots.values()]
        for base, size in ranges:
            for off in range(0, size, 0x1000):
                gpa = base + off
                if self.ref.phys.slot_at(gpa) is None:
                    continue
                want = self.ref.phys.read(gpa, 0x1000)
                got = self.model_bytes(gpa, 0x1000)
                if got != want:
                    i = next(j for j in range(0x1000) if got[j] != want[j])
                    q = i & ~7
                    self.fail(f"guest memory at gpa {gpa + q:#x}: model {got[q:q + 8].hex()} "
                              f"reference {want[q:q + 8].hex()}")

    # -- guest operations -------------------------------------------------------------------------------
    def access(self, vi: int, gva: int, size: int, kind: str, cpl: int, implicit: bool, value: int) -> None:
        COUNTERS.ops += 1
        COUNTERS.accesses += 1
        vcpu, vref = self.vcpus[vi], self.ref.vcpus[vi]
        acc = R.Access(gva, size, kind, cpl, implicit, value & ((1 << (8 * size)) - 1) if kind == "write" else 0)
        self.recent.append((vi, gva))
        del self.recent[:-16]
        desc = f"vcpu{vi}.access({gva:#x}, {size}, {kind!r}, cpl={cpl}, implicit={implicit}" + \
            (f", value={acc.value:#x})" if kind == "write" else ")")
        self.note(desc)
        check = self.ref.address_check(vref, acc)
        self.vm.mmio_log.clear()
        try:
            r = vcpu.access(gva, size, kind, acc.value if kind == "write" else None, cpl=cpl, implicit=implicit)
        except kvmmu.InvalidArgument as e:
            if check == "invalid":
                return
            self.fail(f"{desc} raised {e!r}; reference: {check or 'an access result'}")
        except Exception as e:            # noqa: BLE001 - any crash of the model is a finding
            self.fail(f"{desc} crashed the model: {type(e).__name__}: {e}")
        if check == "invalid":
            self.fail(f"{desc} returned {r}; reference: InvalidArgument (not a 32-bit address)")
        if getattr(r, "l1_exit", None) is not None:
            self.fail(f"{desc}: unexpected nested exit {r.l1_exit}")
        got_fault = None if r.fault is None else (r.fault.vector, r.fault.error_code, r.fault.cr2)
        got = (r.value, got_fault,
               tuple(R.Exit(e.phys_addr, e.len, e.is_write, bytes(e.data)) for e in r.mmio_exit_records))
        if check == "gp":
            if got != (None, (R.GP, 0, None), ()):
                self.fail(f"{desc} gave {_fmt(got)}; reference: #GP(0) (non-canonical / beyond the segment)")
            return
        outs = self.ref.outcomes(vref, acc)
        same = [o for o in outs if o.observable() == got]
        if not same:
            allowed = "\n    ".join(sorted({f"{_fmt(o.observable())} [{o.how}]" for o in outs}))
            self.fail(f"{desc} gave {_fmt(got)}; the architecture allows only:\n    {allowed}")
        # Which allowed outcome did memory see?  (A/D bits and data writes.)
        touched: set[int] = set()
        for o in outs:
            for g, (sz, _b) in o.ad.items():
                touched.update(range(g, g + sz))
            for g, data in o.data:
                touched.update(range(g, g + len(data)))
        spans = _spans(touched)
        model_mem = {g: self.model_bytes(g, n) for g, n in spans}
        match = []
        for o in same:
            exp = _expected_after(self.ref.phys, o, spans)
            if all(exp[g] == model_mem[g] for g, _ in spans):
                match.append(o)
        if not match:
            detail = "; ".join(f"{g:#x}: model {(model_mem[g] or b'').hex()}" for g, _ in spans)
            exp0 = _expected_after(self.ref.phys, same[0], spans)
            want = "; ".join(f"{g:#x}: {(exp0[g] or b'').hex()}" for g, _ in spans)
            self.fail(f"{desc} gave an allowed result {_fmt(got)} but left guest memory [{detail}], "
                      f"the architecture expects e.g. [{want}] ({same[0].how})")
        chosen = match[0]
        self._note_dirty(match)
        COUNTERS.saw("pf" if chosen.fault else "mmio" if chosen.mmio_exit_records else "ram")
        COUNTERS.saw(chosen.how)
        # Commit: A/D first (the data access sees them), speculative fills at that point, then data.
        for g, (sz, b) in chosen.ad.items():
            old = self.ref.phys.read_int(g, sz)
            if old is not None:
                self.ref.phys.write(g, (old | b).to_bytes(sz, "little"))
        if chosen.data:
            self.ref.speculative_fill(self.tracked)
        for g, data in chosen.data:
            self.ref.phys.write(g, data)
        for o in match:
            for tr in o.fills:
                vref.fill(tr)
        if chosen.fault is not None and chosen.fault[0] == R.PF:
            vref.invlpg(chosen.fault_gva)
        self.ref.speculative_fill(self.tracked)

    def invlpg(self, vi: int, gva: int) -> None:
        COUNTERS.ops += 1
        self.note(f"vcpu{vi}.invlpg({gva:#x})")
        vref = self.ref.vcpus[vi]
        self.vcpus[vi].invlpg(gva)
        if vref.regs.la_bits > 32 and not R.canonical(gva, vref.regs.la_bits):
            return                                     # INVLPG of a non-canonical address is a NOP
        vref.invlpg(gva)
        self.ref.speculative_fill(self.tracked)

    def write_cr3(self, vi: int, k: int) -> None:
        COUNTERS.ops += 1
        vref = self.ref.vcpus[vi]
        root = self.roots[k]
        self.note(f"vcpu{vi}.write_cr3({root:#x})")
        new_pdptrs = None
        if vref.regs.mode == "pae":
            raw = [self.ref.phys.read_int(root + 8 * j, 8) for j in range(4)]
            bad = any(x is None for x in raw) or any(R.pae_pdpte_reserved(x, self.maxphyaddr) for x in raw)
            if bad:
                self._expect_gp_register(f"vcpu{vi}.write_cr3({root:#x})", lambda: self.vcpus[vi].write_cr3(root),
                                         raw)
                return
            new_pdptrs = tuple(raw)
        try:
            self.vcpus[vi].write_cr3(root)
        except kvmmu.KvmmuError as e:
            self.fail(f"write_cr3({root:#x}) raised {e!r}")
        vref.regs.cr3 = root
        if new_pdptrs is not None:
            vref.regs.pdptrs = new_pdptrs
        vref.flush(keep_global=True)
        self.ref.speculative_fill(self.tracked)

    def _expect_gp_register(self, desc: str, op: object, raw: list) -> None:
        try:
            op()  # type: ignore[operator]
        except kvmmu.InvalidArgument:
            return
        except Exception as e:            # noqa: BLE001
            self.fail(f"{desc} crashed: {type(e).__name__}: {e}")
        shown = ", ".join("unbacked" if x is None else hex(x) for x in raw)
        self.fail(f"{desc} loaded PDPTEs [{shown}]; the architecture raises #GP(0) "
                  f"(expected kvmmu.InvalidArgument)")

    def control(self, vi: int, what: str) -> None:
        """A guest write to CR0.WP, CR4.SMEP/SMAP/PKE/PGE/PSE or EFER.NXE (one bit toggled)."""
        COUNTERS.ops += 1
        v, vref = self.vcpus[vi], self.ref.vcpus[vi]
        regs = vref.regs
        if what == "wp":
            desc, op = f"write_cr0(WP={int(not regs.wp)})", lambda: v.write_cr0(v.cr0 ^ CR0_WP)
        elif what == "nx":
            desc, op = f"write_efer(NX={int(not regs.nxe)})", lambda: v.write_efer((v.efer ^ EFER_NX) & ~(1 << 10))
        else:
            bit = {"smep": CR4_SMEP, "smap": CR4_SMAP, "pke": CR4_PKE, "pge": CR4_PGE, "pse": CR4_PSE}[what]
            desc, op = f"write_cr4({what.upper()}={int(not getattr(regs, what))})", lambda: v.write_cr4(v.cr4 ^ bit)
        desc = f"vcpu{vi}.{desc}"
        self.note(desc)
        # SDM 4.4.1: with PAE paging, MOV to CR4 changing PGE, PSE or SMEP reloads the PDPTEs (a
        # reserved bit there is #GP); CR0.WP, CR4.SMAP/PKE and EFER.NXE changes do not touch them.
        reload = regs.mode == "pae" and what in ("smep", "pge", "pse")
        if reload:
            raw = [self.ref.phys.read_int(regs.cr3 + 8 * j, 8) for j in range(4)]
            if any(x is None or R.pae_pdpte_reserved(x, self.maxphyaddr) for x in raw):
                self._expect_gp_register(desc, op, raw)
                return
            regs.pdptrs = tuple(raw)  # type: ignore[arg-type]
        if what == "wp":
            regs.wp = not regs.wp
        elif what == "nx":
            regs.nxe = not regs.nxe
            vref.flush()                # the strict reading: no translation survives an NXE change
        else:
            new = not getattr(regs, what)
            setattr(regs, what, new)
            if what == "pge" or (what == "smep" and new):
                vref.flush()
        try:
            op()
        except kvmmu.InvalidArgument as e:
            self.fail(f"guest {desc} raised {e!r}; architecturally it does not fault")
        except Exception as e:            # noqa: BLE001
            self.fail(f"guest {desc} crashed: {type(e).__name__}: {e}")
        self.ref.speculative_fill(self.tracked)

    # -- dirty logging ----------------------------------------------------------------------------------
    def _note_dirty(self, match: list[R.Outcome]) -> None:
        """Pages of dirty-logged slots that every outcome the model may have taken writes: its data, and
        A/D bits it sets that were clear (KVM or the CPU writes the entry only then)."""
        phys = self.ref.phys
        per: list[set[tuple[int, int]]] = []
        for o in match:
            pages = {g >> 12 for g, _ in o.data}
            for g, (sz, b) in o.ad.items():
                old = phys.read_int(g, sz)
                if old is not None and old | b != old:
                    pages.add(g >> 12)
            out = set()
            for gfn in pages:
                slot = phys.slot_at(gfn << 12)
                if slot is not None and slot.flags & LOG_DIRTY and not slot.readonly:
                    out.add((slot.id, gfn - (slot.gpa >> 12)))
            per.append(out)
        for sid, index in set.intersection(*per) if per else ():
            self.dirty.setdefault(sid, set()).add(index)

    def check_dirty_log(self) -> None:
        """KVM_GET_DIRTY_LOG of every dirty-logged slot holds each page the reference saw written."""
        for sid, slot in sorted(self.ref.phys.slots.items()):
            if not slot.flags & LOG_DIRTY:
                continue
            COUNTERS.ops += 1
            try:
                got = self.vm.get_dirty_log(sid)
            except kvmmu.KvmmuError as e:
                self.fail(f"KVM_GET_DIRTY_LOG of slot {sid} raised {e!r}")
            missing = self.dirty.pop(sid, set()) - got
            if missing:
                self.fail(f"KVM_GET_DIRTY_LOG of slot {sid} lacks written pages {sorted(missing)} (got {sorted(got)})")

    def set_pkru(self, vi: int, pkru: int) -> None:
        COUNTERS.ops += 1
        self.note(f"vcpu{vi}.pkru = {pkru:#x}")
        self.vcpus[vi].pkru = pkru
        self.ref.vcpus[vi].regs.pkru = pkru

    def set_ac(self, vi: int, ac: bool) -> None:
        COUNTERS.ops += 1
        self.note(f"vcpu{vi}: EFLAGS.AC = {int(ac)}")
        v = self.vcpus[vi]
        v.rflags = (v.rflags & ~RFLAGS_AC) | (RFLAGS_AC if ac else 0)
        self.ref.vcpus[vi].regs.ac = ac

    # -- guest page-table writes ---------------------------------------------------------------------
    def frames(self) -> list[int]:
        out = [POOL + 0x1000 * i for i in range(NPOOL)] + [KDATA + 0x1000 * i for i in range(NKDATA)]
        out += [p + off for p in PLACEMENTS for off in (0, 0x1000, 0x3000)]
        out += list(MMIO_GPAS) + [0, 0x200000, 0xC000_0000, 0x4000_0000]
        if self.mode == "32bit":
            out = [f for f in out if f < 1 << 32]
        return out

    def entry_address(self, k: int, gva: int, level: int) -> int:
        """gpa of the entry for gva at `level` in address space k, or the deepest one the walk reaches."""
        lay, phys = self.lay, self.ref.phys
        level = max(1, min(level, lay.levels))
        table = self.roots[k]
        lvl = lay.levels
        while True:
            egpa = table + lay.esize * lay.index(gva, lvl)
            if lvl == level:
                return egpa
            entry = phys.read_int(egpa, lay.esize)
            if entry is None or not entry & R.P:
                return egpa
            if entry & R.PS and lvl in lay.large_levels() and not (self.mode == "pae" and lvl == 3):
                return egpa
            nxt = entry & lay.frame_mask()
            if phys.slot_at(nxt) is None:
                return egpa
            table, lvl = nxt, lvl - 1

    def make_entry(self, level: int, kind: str, frame_idx: int, flags: int, pkey: int, nx: bool, rsvd: int,
                   raw: int) -> int:
        lay = self.lay
        frames = self.frames()
        if kind == "zero":
            return 0
        if kind == "random":
            return raw & ((1 << (8 * lay.esize)) - 1)
        if kind == "table":
            frame = POOL + 0x1000 * (frame_idx % NPOOL)
            value = frame | (flags & (R.P | R.RW | R.US | R.PWT | R.PCD | R.A | 0xE00)) | R.P
            if self.mode == "pae" and level == 3:
                value = frame | R.P
        else:
            frame = frames[frame_idx % len(frames)]
            value = flags & 0xFFF
            large = value & R.PS and level in lay.large_levels() and not (self.mode == "pae" and level == 3)
            if large:
                size = large_size(self.mode, level)
                frame &= ~(size - 1)
                value = self.leaf_value(frame, level, value & ~R.PS)
            else:
                value |= frame
            if self.mode in ("4level", "5level") and (level == 1 or large):
                value |= pkey << 59
            if self.mode == "pae" and level == 3:
                value = frame | (value & R.P)
        if nx and self.mode != "32bit":
            value |= R.XD
        if kind == "rsvd":
            choices = [51, self.maxphyaddr, 52, 13, 7, 63] if self.mode != "32bit" else [21, 17, 7]
            value |= 1 << choices[rsvd % len(choices)]
        return value & ((1 << (8 * lay.esize)) - 1)

    def pte_write(self, writer: int, k: int, gva: int, level: int, value: int, part: int) -> None:
        """The guest stores `value` into the entry for gva at `level` of address space k."""
        lay = self.lay
        egpa = self.entry_address(k, gva, level)
        size, shift = lay.esize, 0
        if lay.esize == 8 and part:
            size, shift = ((4, 0), (4, 4), (1, 0), (2, 0))[part % 4]
        piece = (value >> (8 * shift)) & ((1 << (8 * size)) - 1)
        if writer == 0:
            self.access(0, egpa + shift, size, "write", 0, False, piece)
        else:
            self.access(writer, lay.tbase + egpa + shift, size, "write", 0, False, piece)

    # -- memslots (the VMM, between accesses) -------------------------------------------------------------
    def memslots_snapshot(self) -> tuple:
        ms = self.vm.memslots
        slots = tuple(sorted((s.id, s.as_id, s.base_gfn, s.npages, s.userspace_addr, s.flags)
                             for s in ms.all_slots()))
        gens = tuple(ms.generation(i) for i in range(ms.nr_as))
        return slots, gens, tuple(sorted(self.vm.stats.snapshot().items())), self.vm.mmu.n_used_mmu_pages

    def memslot(self, op: str, sid: int, placement: int, flag_bits: int) -> None:
        COUNTERS.ops += 1
        ref = self.ref.phys
        cur = ref.slots.get(sid)
        size = SLOT0_SIZE if sid == 0 else DATA_SLOTS[sid]
        gpa = 0 if sid == 0 and op != "move" else PLACEMENTS[placement % len(PLACEMENTS)]
        self.note(f"memslot {op} slot {sid} gpa {gpa:#x} flags {flag_bits}")
        expect_error = None
        if op == "create":
            if cur is not None:
                op = "flags"
            else:
                for s in ref.slots.values():
                    if s.gpa < gpa + size and gpa < s.gpa + s.size:
                        expect_error = "EEXIST"
        if op in ("delete", "move", "flags", "resize", "toggle_ro") and cur is None:
            op, expect_error = "delete", "EINVAL"
        if op == "move" and cur is not None:
            for s in ref.slots.values():
                if s.id != sid and s.gpa < gpa + size and gpa < s.gpa + s.size:
                    expect_error = "EEXIST"
        if op in ("resize", "toggle_ro"):
            expect_error = "EINVAL"
        before = self.memslots_snapshot()
        try:
            if op == "create":
                hva = self.hvas.get(sid)
                self.vm.set_user_memory_region(sid, gpa, size, flag_bits & 3,
                                               **({"userspace_addr": hva} if hva is not None else {}))
            elif op == "delete":
                self.vm.set_user_memory_region(sid, 0, 0, 0, userspace_addr=self.hvas.get(sid, 0))
            elif op == "move":
                self.vm.set_user_memory_region(sid, gpa, size, cur.flags, userspace_addr=cur.hva)
            elif op == "flags":
                self.vm.set_user_memory_region(sid, cur.gpa, size, cur.flags ^ LOG_DIRTY, userspace_addr=cur.hva)
            elif op == "resize":
                self.vm.set_user_memory_region(sid, cur.gpa, size * 2, cur.flags, userspace_addr=cur.hva)
            elif op == "toggle_ro":
                self.vm.set_user_memory_region(sid, cur.gpa, size, cur.flags ^ READONLY, userspace_addr=cur.hva)
        except kvmmu.MemslotError as e:
            if expect_error is None:
                self.fail(f"memslot {op} of slot {sid} at {gpa:#x} refused: {e}")
            if e.errno_name != expect_error:
                self.fail(f"memslot {op} of slot {sid} at {gpa:#x}: -{e.errno_name}, expected -{expect_error}")
            after = self.memslots_snapshot()
            if after != before:
                self.fail(f"rejected memslot {op} changed the VM: {before} -> {after}")
            return
        except Exception as e:            # noqa: BLE001
            self.fail(f"memslot {op} of slot {sid} crashed the model: {type(e).__name__}: {e}")
        if expect_error is not None:
            self.fail(f"memslot {op} of slot {sid} at {gpa:#x} was accepted; KVM says -{expect_error}")
        self.dirty.pop(sid, None)      # a new, moved or re-flagged slot starts with an empty log
        if op == "create":
            if sid not in self.hvas:
                self.hvas[sid] = self.vm.memslots.slot(sid).userspace_addr
            ref.slots[sid] = R.Slot(sid, gpa, size, flag_bits & 3, self.hvas[sid])
        elif op == "delete":
            del ref.slots[sid]
            self.probe_unbacked(cur.gpa)
        elif op == "move":
            ref.slots[sid] = R.Slot(sid, gpa, size, cur.flags, cur.hva)
            self.probe_unbacked(cur.gpa)
        elif op == "flags":
            ref.slots[sid] = R.Slot(sid, cur.gpa, size, cur.flags ^ LOG_DIRTY, cur.hva)
        self.ref.speculative_fill(self.tracked)

    def probe_unbacked(self, gpa: int) -> None:
        """Right after a delete/move, the old range is MMIO for a vCPU with paging off (if it is unbacked now)."""
        if gpa >> 32 or self.ref.phys.slot_at(gpa) is not None:
            return
        self.access(0, gpa + 0x10, 4, "read", 0, False, 0)

    # -- invariants ------------------------------------------------------------------------------------
    def audit(self) -> None:
        COUNTERS.ops += 1
        try:
            self.vm.audit()
        except kvmmu.AuditError as e:
            self.fail(f"vm.audit(): {e}")

    def check_tlbs(self, other: World | None) -> None:
        """Every live TLB entry maps this VM's memory, for a translation the reference allows."""
        phys = self.ref.phys
        other_ranges = []
        if other is not None:
            other_ranges = [(s.hva, s.hva + s.size) for s in other.ref.phys.slots.values()]
        for vi, (v, vref) in enumerate(zip(self.vcpus, self.ref.vcpus, strict=True)):
            if any(req in v.requests for req in _REQ_FLUSHES) or not v.mmu.root_valid:
                continue                      # flushed before this vCPU can run again
            for vpn, entry in v.cpu.tlb.items():
                page, acc, dirty = entry[0], entry[1], entry[2] & 2      # kinds: written through
                if any(lo <= page < hi for lo, hi in other_ranges):
                    self.fail(f"vcpu{vi}'s TLB maps page {vpn:#x} to host page {page:#x} of the OTHER VM")
                # Every gpa of the host page: an aliased slot (World(alias=True)) gives it two.
                slots = {s.gpa + (page - s.hva): s for s in phys.slots.values() if s.hva <= page < s.hva + s.size}
                if not slots:
                    self.fail(f"vcpu{vi}'s TLB maps page {vpn:#x} to host page {page:#x}, in no memslot of this VM")
                if acc & 2 and dirty:
                    slots = {g: s for g, s in slots.items() if not s.readonly}
                    if not slots:
                        self.fail(f"vcpu{vi}'s TLB lets page {vpn:#x} write read-only slot(s) of host page {page:#x}")
                gva = (vpn << 12) & R.U64
                regs = vref.regs
                cands = list(vref.cached(gva))
                w = R.walk(regs, phys, gva, self.maxphyaddr)
                if w.tr is not None:
                    cands.append(w.tr)
                ok = False
                for tr in cands:
                    if tr.gpa(gva) not in slots:
                        continue
                    allowed = (1 if tr.x else 0) | (4 if tr.u else 0)
                    if tr.w or (self.flavour == "shadow" and not regs.wp and not acc & 4):
                        allowed |= 2
                    if regs.mode == "nonpaging" or not acc & ~allowed & 7:
                        ok = True
                        break
                if not ok:
                    shown = ", ".join(f"{t.gpa(gva):#x}/{'w' if t.w else '-'}{'u' if t.u else '-'}"
                                      f"{'x' if t.x else '-'}" for t in cands) or "none"
                    gpas = "/".join(map(hex, sorted(slots)))
                    self.fail(f"vcpu{vi}'s TLB maps page {gva:#x} to gpa {gpas} with access {acc:03b}; "
                              f"the guest's translations allow only [{shown}]")
            # A TDP CPU's cached guest-physical mappings: each one is what the memslot map says now.
            for gfn, hpa in getattr(v.cpu, "gpa_cache", {}).items():
                gpa = gfn << 12
                slot = next((s for s in phys.slots.values() if s.gpa <= gpa < s.gpa + s.size), None)
                if slot is None or slot.hva + (gpa - slot.gpa) != hpa:
                    where = "no memslot" if slot is None else f"slot {slot.id} at {slot.hva + (gpa - slot.gpa):#x}"
                    self.fail(f"vcpu{vi} caches gpa {gpa:#x} at host address {hpa:#x}; the memslot map says {where}")


def _spans(addrs: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a in sorted(addrs):
        if out and out[-1][0] + out[-1][1] == a and (a & 0xFFF):
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((a, 1))
    return out


def _expected_after(phys: R.Phys, o: R.Outcome, spans: list[tuple[int, int]]) -> dict[int, bytes | None]:
    exp: dict[int, bytes | None] = {}
    for g, n in spans:
        cur = phys.read(g, n)
        if cur is None:
            exp[g] = None
            continue
        buf = bytearray(cur)
        for eg, (sz, b) in o.ad.items():
            for i in range(sz):
                if g <= eg + i < g + n:
                    buf[eg + i - g] |= (b >> (8 * i)) & 0xFF
        for dg, data in o.data:
            for i, byte in enumerate(data):
                if g <= dg + i < g + n:
                    buf[dg + i - g] = byte
        exp[g] = bytes(buf)
    return exp


def _fmt(obs: tuple) -> str:
    value, fault, exits = obs
    parts = []
    if fault is not None:
        vec, code, cr2 = fault
        parts.append(f"#PF(ec={code:#x}, cr2={cr2:#x})" if vec == R.PF else f"#GP({code})")
    if value is not None:
        parts.append(f"value={value:#x}")
    if exits:
        parts.append("exits=[" + ", ".join(f"{'W' if e.is_write else 'R'} {e.gpa:#x}/{e.len}:{e.data.hex()}"
                                           for e in exits) + "]")
    return " ".join(parts) or "ok"
