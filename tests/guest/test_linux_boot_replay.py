"""Replaying windows of the real Linux boot: what must hold by KVM's design, whatever the model counts.

Expected values are computed here from the records (which gpa, gva page, vCPU and paging mode each access
had) and the spec, never from a replay:

* §3.8 step 4 + §3.12: with MMIO caching off no MMIO spte is ever installed; every MMIO access reaches the
  full fault path once and returns EMULATE (pf_emulate); under shadow paging that path walks the guest
  tables once and fills the per-vCPU cache, which the emulator then uses (no second walk); a direct MMU
  (TDP) hands the emulator the gpa, so KVM walks no guest table at all.
* §3.9 + §3.3: with caching on, the full path creates one MMIO spte per *spte slot*: with TDP that is one
  per gfn (the vCPUs share the root); under shadow paging it is one per guest mapping -- per gfn while
  paging is off (the nonpaging root is direct), per gva page once paging is on (the level-1 shadow page
  of a guest page table is shared by every vCPU whose role matches, so a second vCPU's first touch finds
  the spte and takes the fast path).  Every other MMIO access is the fast path: pf_emulate counts only
  the creations.
* §3.12 step 4: an access inside an in-kernel device's range completes in the kernel; every other one
  exits to the VMM in ceil(len / 8) pieces -- under every flavour and policy.
* 'zap' and 'generation' only differ when memslots change; nothing changes them here.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvmmu.guest.linux_boot import FIRMWARE_PHASE, LinuxBootWorkload, load_linux_boot
from kvmmu.guest.trace import ReplayResult, TraceRecord, replay

FLAVOURS = ("shadow", "ept")
POLICIES = ("off", "zap", "generation")
COUNT = 3000


@pytest.fixture(scope="module")
def w() -> LinuxBootWorkload:
    return load_linux_boot()


def _first_kernel(w: LinuxBootWorkload) -> int:
    return next(n for n, i in enumerate(w.mmio_index) if w.records[i].phase != FIRMWARE_PHASE)


def _first_of_vcpu1(w: LinuxBootWorkload) -> int:
    return next(n for n, i in enumerate(w.mmio_index) if w.records[i].vcpu == 1)


def _remap(w: LinuxBootWorkload) -> int:
    """The MMIO access right after the loader's remap events."""
    first = next(i for i, r in enumerate(w.records) if r.region is None)
    return next(n for n, i in enumerate(w.mmio_index) if i > first)


WINDOWS = {
    "firmware": lambda w: (0, COUNT),                               # vCPU 0, paging off
    "kernel": lambda w: (_first_kernel(w), COUNT),                  # vCPU 0 switches paging on
    "two-vcpus": lambda w: (_first_of_vcpu1(w) - COUNT // 2, COUNT),  # vCPU 1's first accesses
    "remap": lambda w: (_remap(w) - COUNT // 2, COUNT),             # iounmap + INVLPG + ioremap
}
_cache: dict[tuple[str, str, str], tuple[list[TraceRecord], ReplayResult]] = {}


def run(w: LinuxBootWorkload, window: str, flavour: str, policy: str) -> tuple[list[TraceRecord], ReplayResult]:
    key = (window, flavour, policy)
    if key not in _cache:
        recs = w.window(*WINDOWS[window](w))
        _cache[key] = (recs, replay(w.setup(flavour, policy), recs))
    return _cache[key]


def mmio(recs: list[TraceRecord]) -> list[TraceRecord]:
    return [r for r in recs if r.region is not None]


def test_windows_are_what_they_say(w: LinuxBootWorkload) -> None:
    recs = {name: mmio(w.window(*WINDOWS[name](w))) for name in WINDOWS}
    assert all(len(r) == COUNT for r in recs.values())
    assert {r.phase for r in recs["firmware"]} == {FIRMWARE_PHASE} and {r.vcpu for r in recs["firmware"]} == {0}
    assert FIRMWARE_PHASE not in {r.phase for r in recs["kernel"]}
    assert {r.vcpu for r in recs["two-vcpus"]} == {0, 1}
    assert any(r.region is None for r in w.window(*WINDOWS["remap"](w)))


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("policy", POLICIES)
def test_the_guest_sees_the_recorded_values(w: LinuxBootWorkload, window: str, flavour: str, policy: str) -> None:
    """Every read returns what the real guest read; no access faults; every device piece arrives at the
    recorded gpa with the recorded data."""
    recs, r = run(w, window, flavour, policy)
    reads = [x for x in recs if x.op == "read" and x.value is not None]
    assert (r.fault_count, r.mismatch_count, r.misrouted, r.undelivered, r.write_mismatches) == (0, 0, 0, 0, 0)
    assert r.values_checked == len(reads)


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_caching_off_installs_no_mmio_spte(w: LinuxBootWorkload, window: str, flavour: str) -> None:
    """§3.8: mmio_caching off -> no MMIO spte; every MMIO access takes the full path once and is emulated."""
    recs, r = run(w, window, flavour, "off")
    n = len(mmio(recs))
    ram_writes = sum(1 for x in recs if x.region is None and x.op == "write")
    t = r.total
    assert t.stats.get("pf_mmio_spte_created", 0) == 0
    assert t.mmio_full_path == t.mmio_accesses == n
    assert t.stats["pf_emulate"] == n
    assert n <= t.stats.get("insn_emulation", 0) <= n + ram_writes
    paging_on = sum(1 for x in mmio(recs) if x.phase != FIRMWARE_PHASE)
    if flavour == "shadow":
        # one walk per MMIO access with paging on; the page-table stores add one walk each when they fault
        assert paging_on <= t.counters.get("guest_walks", 0) <= paging_on + ram_writes
    else:
        assert t.counters.get("guest_walks", 0) == 0


def expected_sptes(recs: list[TraceRecord], flavour: str) -> int:
    """Distinct spte slots the MMIO accesses need (see the module docstring); a remapped gva page needs a
    second one under shadow paging (its first was dropped when the guest cleared the PTE)."""
    if flavour != "shadow":
        return len({x.gpa >> 12 for x in mmio(recs)})
    slots = set()
    mapping: dict[int, int] = {}
    remaps = 0
    for x in mmio(recs):
        if x.phase == FIRMWARE_PHASE:
            slots.add(("gfn", x.gpa >> 12))
        else:
            page = x.gva >> 12
            if mapping.setdefault(page, x.gpa >> 12) != x.gpa >> 12:
                mapping[page] = x.gpa >> 12
                remaps += 1
            slots.add(("gva", page))
    return len(slots) + remaps


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_generation_creates_one_spte_per_slot_and_uses_the_fast_path(w: LinuxBootWorkload, window: str,
                                                                    flavour: str) -> None:
    """§3.9/§3.3: no memslot changes, so each MMIO spte is created once, on the first touch of its slot by
    any vCPU; all other MMIO accesses are resolved by the fast path (pf_emulate moves only on creation)."""
    recs, r = run(w, window, flavour, "generation")
    t = r.total
    created = t.stats.get("pf_mmio_spte_created", 0)
    assert created == expected_sptes(recs, flavour)
    assert t.stats.get("pf_emulate", 0) == created
    # The full path ran for the creations and for RAM (page-table pages under EPT, the guest's own stores).
    assert t.stats.get("pf_taken", 0) == created + t.stats.get("pf_fixed", 0) + t.stats.get("pf_spurious", 0)
    assert t.counters.get("mmio_fastpath", 0) + t.counters.get("mmio_cache_hits", 0) >= t.mmio_accesses - created


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_where_an_access_completes_does_not_depend_on_the_policy(w: LinuxBootWorkload, window: str,
                                                                  flavour: str) -> None:
    """§3.12 step 4: the in-kernel LAPIC/IOAPIC complete their accesses; all others exit to the VMM, one
    KVM_EXIT_MMIO per <= 8-byte piece -- with any MMU flavour and MMIO policy."""
    for policy in POLICIES:
        recs, r = run(w, window, flavour, policy)
        kernel = sum(-(-x.size // 8) for x in mmio(recs) if w.in_kernel(x.gpa))
        vmm = sum(-(-x.size // 8) for x in mmio(recs) if not w.in_kernel(x.gpa))
        assert r.total.counters.get("iobus_handled", 0) == kernel
        assert r.total.counters.get("userspace_exits", 0) == vmm
        assert r.total.stats.get("mmio_exits", 0) == sum(1 for x in mmio(recs) if not w.in_kernel(x.gpa))


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_zap_and_generation_agree_without_memslot_changes(w: LinuxBootWorkload, window: str, flavour: str) -> None:
    """The 2011 design and today's differ only in what a memslot change does; the boot makes none."""
    zap = run(w, window, flavour, "zap")[1].total
    gen = run(w, window, flavour, "generation")[1].total
    assert (zap.stats, zap.counters) == (gen.stats, gen.counters)


def test_shadow_remap_drops_the_stale_mmio_spte(w: LinuxBootWorkload) -> None:
    """§3.9 sync_mmio_spte / §3.11: when the guest clears the PTE of an ioremapped page and flushes, the
    MMIO spte for the old gfn must go; an access after the new ioremap reaches the new device.  Without
    the INVLPGs (a guest forgetting its TLB flush) the stale spte routes it to the old device."""
    (conflict,) = w.conflicts
    page = conflict.gva_page
    kernel_regs = next(r for r in w.records if r.has_sregs and r.phase != FIRMWARE_PHASE)
    regs = {n: getattr(kernel_regs, n) for n in ("cr0", "cr3", "cr4", "efer")}
    stream = [r for r in w.records if r.region is None or r.gva >> 12 == page >> 12]
    first: set[int] = set()
    for i, r in enumerate(stream):
        if r.vcpu not in first:
            first.add(r.vcpu)
            stream[i] = replace(r, **regs)
    assert {r.gpa >> 12 for r in stream if r.region} == {g >> 12 for g, _, _ in conflict.mappings}
    ok = replay(w.setup("shadow", "generation"), stream)
    assert (ok.misrouted, ok.mismatch_count) == (0, 0)
    assert ok.total.stats["pf_mmio_spte_created"] == 2 and ok.total.stats["invlpg"] == 2
    stale = replay(w.setup("shadow", "generation"), [r for r in stream if r.op != "invlpg"])
    assert stale.misrouted > 0


def test_qemu_profile_completes_coalesced_and_ioeventfd_writes_in_the_kernel(w: LinuxBootWorkload) -> None:
    """QEMU's coalesced VGA window and virtio ioeventfds: those writes no longer exit (reads still do), and
    the guest still sees every recorded value."""
    recs = w.window(0, COUNT)
    plain = replay(w.setup("shadow", "generation"), recs)
    qemu = replay(w.setup("shadow", "generation", profile="qemu"), recs)
    vga_writes = sum(1 for x in mmio(recs) if x.op == "write" and 0xA0000 <= x.gpa < 0xC0000)
    assert vga_writes > 0
    assert qemu.mismatch_count == qemu.misrouted == qemu.undelivered == 0
    saved = plain.total.counters["userspace_exits"] - qemu.total.counters["userspace_exits"]
    # the ring holds 169 entries; a full ring sends the write to userspace, which drains it
    assert vga_writes - vga_writes // 169 - 1 <= saved <= vga_writes
