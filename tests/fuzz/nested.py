"""Nested EPT against an SDM reference: random L1 EPT tables, L2 accesses, every result checked.

L1 (a VM with mmu="ept") keeps its EPT tables in a pool of 8 pages; every table entry is drawn at
random: any R/W/X mix (W without R and X-only are misconfigurations: the modelled CPU reports no
execute-only support), any memory type (2, 3 and 7 are reserved), large pages at levels 2 and 3,
reserved bits, and targets that make the tables loop (an entry pointing at an upper-level table, or
at its own table) and map themselves into L2 (a leaf whose frame is a table page).  L2 runs with
paging off, so its addresses are L2 physical addresses, and its accesses are checked against
`ept_walk`, the SDM's EPT translation (Vol. 3C 29.3) written here from the SDM, not from the model:

- an entry with bits 2:0 = 0 is not present: EPT violation;
- a present entry with reserved bits (51:MAXPHYADDR; 7:3 of a PML4E; 6:3 of a non-leaf PDPTE/PDE;
  29:12 of a 1 GiB and 20:12 of a 2 MiB page), W without R, X without R, or (leaf) memory type
  2, 3 or 7: EPT misconfiguration;
- the access needs R (read), W (write) or X (fetch) in every entry used, else EPT violation, whose
  qualification has the access type in bits 2:0 and the AND of the entries' R/W/X in bits 5:3;
- otherwise the L1 gpa is the leaf's frame plus the offset: RAM (a value, memory written), a
  read-only slot (a write is a KVM_EXIT_MMIO write), or no memslot (KVM_EXIT_MMIO).

A/D bits are off in the EPTP (their timing under a shadow EPT is not architecturally fixed, and L2
reads the tables through the self-maps).  L2 never stores into a table page: with cached EPT
translations allowed until INVEPT (SDM 29.4), the result would not be unique (the shadow MMU's
write tracking under such stores is tested by tests/kvm/test_unsync_count.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import kvmmu
from kvmmu.arch.bits import X86_CR0_PE

TABLES = [0x10000 + 0x1000 * i for i in range(8)]      # the L1 EPT pool (slot 0)
DATA = [0x100000 + 0x1000 * i for i in range(8)]       # L1 RAM pages L2 may reach
RO_SLOT = (0x800000, 0x10000)                          # slot 1, read-only
MMIO = [0xD000_0000, 0xFEE0_0000]                      # no memslot
INDEXES = (0, 1, 2, 3, 511)                            # entries populated in every table page
EPTP_WB_4LEVEL = 0x18 | 6


@dataclass
class Result:
    """What an L2 access must produce."""

    kind: str                       # "violation" | "misconfig" | "ram" | "mmio"
    gpa: int = 0                    # L1 gpa (ram, mmio)
    qual: int = 0                   # violation: exit qualification bits 5:0


def rsvd_bits(level: int, entry: int, maxphyaddr: int) -> bool:
    """SDM 29.3.3.1: reserved bits of a present EPT entry at `level` (4 = PML4E)."""
    high = ((1 << 52) - 1) & ~((1 << maxphyaddr) - 1)
    if entry & high:
        return True
    large = bool(entry & 0x80) and level in (2, 3)
    if level == 4:
        return bool(entry & 0xF8)
    if level in (2, 3) and not large:
        return bool(entry & 0x78)
    if large:
        low = ((1 << 30) - 1) & ~0xFFF if level == 3 else ((1 << 21) - 1) & ~0xFFF
        return bool(entry & low)
    return False


def ept_walk(read8: object, eptp: int, ngpa: int, access: str, maxphyaddr: int) -> Result:
    """The SDM's 4-level EPT translation of `ngpa` for a read, write or fetch."""
    need = {"read": 1, "write": 2, "fetch": 4}[access]
    table = eptp & ~0xFFF & ((1 << maxphyaddr) - 1)
    rights = 7
    for level in (4, 3, 2, 1):
        entry = read8(table + 8 * ((ngpa >> (12 + 9 * (level - 1))) & 511))  # type: ignore[operator]
        if entry is None:
            # A table in no memory: the SDM leaves it undefined; KVM cannot read the entry
            # (kvm_vcpu_gfn_to_hva_prot fails in FNAME(walk_addr_generic)) and reflects an EPT violation.
            return Result("violation", qual=-1)
        xwr = entry & 7
        if xwr == 0:
            return Result("violation", qual=need)            # the AND of the rights so far with 0
        if xwr in (0b010, 0b110, 0b100) or rsvd_bits(level, entry, maxphyaddr):
            return Result("misconfig")
        leaf = level == 1 or (entry & 0x80 and level in (2, 3))
        if leaf and (entry >> 3) & 7 in (2, 3, 7):
            return Result("misconfig")
        rights &= xwr
        if leaf:
            if not rights & need:
                return Result("violation", qual=need | (rights << 3))
            span = 1 << (12 + 9 * (level - 1))
            frame = entry & ((1 << maxphyaddr) - 1) & ~(span - 1)
            return Result("ram", gpa=frame | (ngpa & (span - 1)))
        table = entry & ((1 << maxphyaddr) - 1) & ~0xFFF
    raise AssertionError("unreachable")


def random_entry(rng: random.Random, maxphyaddr: int) -> int:
    """One EPT entry: mostly sane, with every R/W/X mix, memory type, page size and target."""
    xwr = 7 if rng.random() < 0.6 else rng.randrange(8)
    r = rng.random()
    if r < 0.45:
        frame = rng.choice(TABLES)                              # a table: loops and self-maps
    elif r < 0.75:
        frame = rng.choice(DATA)
    elif r < 0.85:
        frame = RO_SLOT[0] + 0x1000 * rng.randrange(RO_SLOT[1] >> 12)
    else:
        frame = rng.choice(MMIO)
    value = frame | xwr
    # A memory type is a leaf's; in a table pointer bits 5:3 are reserved.  Mostly sane, so that walks
    # get somewhere, but every type is drawn.
    usual = 0 if frame in TABLES else 6
    value |= (usual if rng.random() < 0.9 else rng.randrange(8)) << 3
    if rng.random() < 0.15:
        value |= 0x80                                            # a large page where the level allows
        value &= ~((1 << 21) - 1) if rng.random() < 0.7 else ~((1 << 30) - 1)
        value |= xwr | (6 << 3) | 0x80
    if rng.random() < 0.03:
        value |= 1 << rng.choice((maxphyaddr, 51, 7, 12, 40))   # a reserved bit (or a high frame bit)
    return value & ((1 << 64) - 1)


class NestedWorld:
    """L1 with random EPT tables and one vCPU running L2 with paging off."""

    def __init__(self, seed: int, maxphyaddr: int = 46) -> None:
        self.rng = rng = random.Random(seed)
        self.maxphyaddr = maxphyaddr
        self.vm = vm = kvmmu.VM(mmu="ept", guest_maxphyaddr=maxphyaddr)
        vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=4 << 20)
        vm.set_user_memory_region(slot=1, guest_phys_addr=RO_SLOT[0], memory_size=RO_SLOT[1], flags=2)
        vm.mmio_handler = lambda e: None if e.is_write else 0x5A5A5A5A5A5A5A5A & ((1 << (8 * e.len)) - 1)
        for table in TABLES:
            for index in INDEXES:
                if rng.random() < 0.8:
                    vm.write_phys(table + 8 * index, random_entry(rng, maxphyaddr).to_bytes(8, "little"))
        if rng.random() < 0.9:
            # Mostly a sane top: PML4E 0 points at a PDPT (the rest of the walk is as drawn).
            vm.write_phys(TABLES[0], (rng.choice(TABLES[1:]) | 7).to_bytes(8, "little"))
        for page in DATA + [RO_SLOT[0] + 0x1000 * i for i in range(RO_SLOT[1] >> 12)]:
            vm.write_phys(page, rng.randbytes(64))
        # The reference's copy of L1 memory, page by page as L2 reaches it (taken before any access).
        self.mem: dict[int, bytearray] = {}
        for page in TABLES + DATA + [RO_SLOT[0] + 0x1000 * i for i in range(RO_SLOT[1] >> 12)]:
            self.mem[page] = bytearray(vm.read_phys(page, 0x1000))
        self.eptp = TABLES[0] | EPTP_WB_4LEVEL
        self.vcpu = vm.create_vcpu()
        self.vcpu.set_sregs(cr0=X86_CR0_PE, cr3=0, cr4=0, efer=0)
        self.enter()

    def enter(self) -> None:
        self.vcpu.enter_guest_mode(self.eptp, cr0=X86_CR0_PE, cr3=0, cr4=0, efer=0)

    def ref_page(self, gpa: int) -> bytearray:
        """The reference's page (memory L2 never reached before is still the zeros the VMM mapped)."""
        return self.mem.setdefault(gpa & ~0xFFF, bytearray(0x1000))

    def read8(self, gpa: int) -> int | None:
        if not self.backed(gpa):
            return None
        off = gpa & 0xFFF
        return int.from_bytes(self.ref_page(gpa)[off:off + 8], "little")

    def ngpa(self, rng: random.Random) -> int:
        """An L2 address whose EPT indexes are populated ones (PDPT index 0-3: 32-bit ngpas)."""
        i3, i2, i1 = rng.randrange(4), rng.choice(INDEXES), rng.choice(INDEXES)
        return (i3 << 30) | (i2 << 21) | (i1 << 12) | (8 * rng.randrange(480))

    def expect(self, ngpa: int, kind: str) -> Result:
        r = ept_walk(self.read8, self.eptp, ngpa, kind, self.maxphyaddr)
        if r.kind == "ram":
            gpa = r.gpa
            if not self.backed(gpa) or (kind == "write" and RO_SLOT[0] <= gpa < RO_SLOT[0] + RO_SLOT[1]):
                return Result("mmio", gpa=gpa)
        return r

    @staticmethod
    def backed(gpa: int) -> bool:
        return gpa < 4 << 20 or RO_SLOT[0] <= gpa < RO_SLOT[0] + RO_SLOT[1]

    def step(self, rng: random.Random) -> str | None:
        """One L2 access (or a VM exit and re-entry); a mismatch is returned as a message."""
        if not self.vcpu.mmu_is_nested:
            self.enter()                      # L1 handled the last VM exit and resumes L2
        if rng.random() < 0.05:
            self.vcpu.leave_guest_mode()      # any other VM exit to L1, and back
            self.enter()
            return None
        ngpa = self.ngpa(rng)
        kind = rng.choice(("read", "read", "write", "fetch"))
        size = rng.choice((1, 2, 4, 8))
        want = self.expect(ngpa, kind)
        if kind == "write" and want.kind == "ram" and any(t <= want.gpa < t + 0x1000 for t in TABLES):
            return None                       # no stores into the EPT tables (see the module doc)
        value = rng.getrandbits(8 * size) if kind == "write" else None
        off = want.gpa & 0xFFF
        before = bytes(self.ref_page(want.gpa)[off:off + size]) if want.kind == "ram" else None
        self.vm.mmio_log.clear()
        desc = f"L2 {kind} of {size} bytes at ngpa {ngpa:#x}"
        try:
            r = self.vcpu.access(ngpa, size, kind, value)
        except Exception as e:               # noqa: BLE001 - any exception from a guest access is a finding
            return f"{desc} raised {type(e).__name__}: {e} (reference: {want})"
        got_exit = r.l1_exit
        if want.kind in ("violation", "misconfig"):
            reason = f"ept_{want.kind}"
            if got_exit is None or got_exit.reason != reason or got_exit.ngpa != ngpa:
                return f"{desc}: {r}; reference: {reason} at {ngpa:#x}"
            if want.kind == "violation" and want.qual >= 0 and got_exit.qualification & 0x3F != want.qual:
                return f"{desc}: qualification {got_exit.qualification:#x}; reference bits 5:0 = {want.qual:#x}"
            return None
        if got_exit is not None or r.fault is not None:
            return f"{desc}: {r}; reference: {want.kind} at L1 gpa {want.gpa:#x}"
        if want.kind == "mmio":
            exits = [(e.phys_addr, e.len, e.is_write) for e in r.mmio_exit_records]
            if exits != [(want.gpa, size, kind == "write")]:
                return f"{desc}: exits {exits}; reference: one KVM_EXIT_MMIO at {want.gpa:#x}"
            return None
        if r.mmio_exit_records:
            return f"{desc}: exits {r.mmio_exit_records}; reference: RAM at L1 gpa {want.gpa:#x}"
        if kind == "write":
            self.ref_page(want.gpa)[off:off + size] = value.to_bytes(size, "little")  # type: ignore[union-attr]
        elif r.value != int.from_bytes(before, "little"):  # type: ignore[arg-type]
            return f"{desc}: value {r.value}; L1 gpa {want.gpa:#x} holds {before.hex()}"  # type: ignore[union-attr]
        return self.compare_memory()

    def compare_memory(self) -> str | None:
        """Every page the reference knows equals the model's (so no store landed anywhere else)."""
        for page, want in self.mem.items():
            if self.vm.read_phys(page, 0x1000) != want:
                return f"L1 memory at {page:#x} differs from the reference"
        return None
