"""`kvmmu explain`: one guest access on the default machine, step by step.

It boots the modelled guest OS on a one-vCPU default machine, makes `warm` identical accesses, then
records the explained one: the guest's translation (its page tables decoded), KVM's tables before and
after (sptes decoded: links, leaves, MMIO sptes with gfn / access / generation), whether the TLB
answered, KVM's events in order with what each means, the path the access took, and every counter it
moved.
"""

from __future__ import annotations

from typing import Any

from ..errors import ScenarioError
from ..guest.os import DIRECT_MAP, FIXMAP_APIC, USER_HEAP, GuestOS, OsParams
from ..hw.host import Host
from ..kvm.mmu.spte import (
    SPTE_MMU_PRESENT_MASK,
    get_mmio_spte_access,
    get_mmio_spte_generation,
    get_mmio_spte_gfn,
    is_mmio_spte,
)
from ..kvm.tracepoints import format_event
from ..vmm.machine import Machine, MachineSpec

TARGETS = {
    # name: (how to find the gva, default kind, size, what it is)
    "doorbell": ("virtio-net-notify", "write", 2, "the virtio-net TX doorbell (ioremap; an ioeventfd: in-kernel)"),
    "status": ("virtio-net-cfg", "read", 4, "a virtio-net config register (ioremap; QEMU: userspace)"),
    "testdev": ("pci-testdev", "write", 4, "the pci-testdev BAR (ioremap; QEMU: userspace)"),
    "serial": ("serial", "write", 1, "the serial port's THR (ioremap; QEMU: userspace)"),
    "lapic": ("@lapic", "write", 4, "the local APIC EOI register (fixmap; KVM's in-kernel LAPIC)"),
    "ram": ("@ram", "read", 8, "a page of kernel RAM through the direct map"),
    "user": ("@user", "write", 8, "a fresh heap page of a user process at CPL3 (demand paging)"),
}

GLOSS = {
    "kvm_exit": "the CPU exited to KVM: an intercepted #PF (shadow), an EPT violation or misconfiguration, a #NPF",
    "kvm_page_fault": "the exit handler passes the fault to KVM's MMU (not for an EPT misconfiguration)",
    "kvm_entry": "KVM resumed the guest",
    "vcpu_match_mmio": "the per-vCPU MMIO cache matched: no walk needed to know it is MMIO",
    "check_mmio_spte": "the fast path compared the MMIO spte's generation with the memslots'",
    "handle_mmio_page_fault": "the fast path recognised an MMIO spte: emulate without the full fault path",
    "kvm_mmu_pagetable_walk": "KVM walked the guest's page tables in software (each gpte read through a memslot)",
    "kvm_mmu_walker_error": "the guest's own tables fault: KVM will inject a #PF",
    "mark_mmio_spte": "no memslot backs the gfn: KVM installed an MMIO spte for next time",
    "kvm_mmu_set_spte": "KVM installed a leaf spte mapping guest RAM",
    "kvm_mmu_get_page": "KVM found or allocated a shadow page",
    "page_fault_done": "(model) the full fault path finished with this result",
    "kvm_emulate_insn": "KVM emulated the instruction",
    "kvm_mmio": "an emulated MMIO access: to an in-kernel device, or (unsatisfied-read / write) to userspace",
    "kvm_userspace_exit": "KVM_RUN returned to the VMM (KVM_EXIT_MMIO): its device answered",
    "kvm_inj_exception": "KVM injected a #PF into the guest (the guest's own tables say no)",
    "kvm_mmu_prepare_zap_page": "KVM zapped a shadow page",
    "kvm_mmu_unsync_page": "KVM let a guest page table go unsync (writable) instead of write-protecting it",
    "write_tracked_gpte": "(model) an emulated write hit a shadowed guest page table (kvm_mmu_track_write)",
    "memslot_update": "(model) the VMM changed a memslot",
    "kvm_mmu_zap_all_fast": "every shadow page became obsolete",
    "host_unmap": "(model) the host swapped a page out: the mmu notifier dropped its sptes",
    "host_swapin": "(model) KVM touched a swapped-out host page: the host read it back from swap",
    "kvm_cr": "the guest wrote a control register (an intercepted MOV to CR)",
}


def _flags(pte: int) -> str:
    names = [(1, "P"), (2, "RW"), (4, "US"), (8, "PWT"), (16, "PCD"), (32, "A"), (64, "D"), (128, "PS"), (256, "G")]
    out = [n for b, n in names if pte & b]
    if pte >> 63:
        out.append("NX")
    return " ".join(out) or "-"


def _guest_walk(vm: Any, cr3: int, gva: int) -> tuple[list[str], int | None]:
    lines, table = [], cr3 & ~0xFFF
    names = {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
    for level in (4, 3, 2, 1):
        idx = (gva >> (12 + 9 * (level - 1))) & 511
        pte = vm.read_guest_quiet(table + 8 * idx, 8)
        addr = pte & 0x000FFFFFFFFFF000
        lines.append(f"   {names[level]:<5} [{idx:3}] at gpa {table + 8 * idx:#014x} = {pte:#018x}  ({_flags(pte)})")
        if not pte & 1:
            lines.append("   -> not present: the guest would take a #PF")
            return lines, None
        if level in (2, 3) and pte & 128:
            size = 1 << (12 + 9 * (level - 1))
            gpa = (addr & ~(size - 1)) | (gva & (size - 1))
            lines.append(f"   -> a {size >> 20} MiB page: gpa {gpa:#x}")
            return lines, gpa
        table = addr
    gpa = table | (gva & 0xFFF)
    lines.append(f"   -> gpa {gpa:#x}")
    return lines, gpa


def _kvm_tables(vcpu: Any, addr: int) -> list[str]:
    mmu = vcpu.mmu
    masks = mmu.masks
    out = []
    for level, spte in mmu.shadow_walk(addr):
        if is_mmio_spte(masks, spte):
            gen = get_mmio_spte_generation(masks, spte) if masks.gen is not None else None
            out.append(f"   level {level}: {spte:#018x}  MMIO spte: gfn {get_mmio_spte_gfn(masks, spte):#x}, access "
                       f"{get_mmio_spte_access(masks, spte):#x}" + (f", generation {gen}" if gen is not None else
                                                                    " (2011: no generation)"))
            break
        if not spte & SPTE_MMU_PRESENT_MASK:
            out.append(f"   level {level}: {spte:#018x}  not present")
            break
        pfn = (spte >> 12) & ((1 << 40) - 1)
        sp = mmu.kvm.pages_by_pfn.get(pfn)
        if sp is not None and level > 1 and not spte & 0x80:
            out.append(f"   level {level}: {spte:#018x}  link to a shadow page (gfn {sp.gfn:#x}, level {sp.level}"
                       f"{', direct' if sp.direct else ''}{', unsync' if sp.unsync else ''})")
        else:
            w = "writable" if spte & 2 else "read-only"
            out.append(f"   level {level}: {spte:#018x}  leaf: host page {pfn << 12:#x}, {w}")
            break
    if not out:
        out.append("   (no root loaded)")
    return out


def explain(mmu: str = "shadow", policy: str = "generation", target: str = "doorbell", gva: int | None = None,
            kind: str | None = None, warm: int = 1, memslot_change: bool = False, swap_tables: bool = False,
            size: int | None = None, plot: str | None = None) -> str:
    """The explanation as text; with `plot`, also a picture of the access's way through the guest's
    tables, KVM's tables and KVM's events, written to that file (needs matplotlib)."""
    if plot is not None:
        from .plot import check_output, require_matplotlib
        require_matplotlib()
        check_output(plot)
    if target not in TARGETS and gva is None:
        raise ScenarioError(f"--target {target!r}: choose from {', '.join(TARGETS)} (or give --gva)")
    if not 0 <= warm <= 1000:
        raise ScenarioError(f"--warm {warm}: between 0 and 1000 warm-up accesses")
    host = Host(memory_limit=4 << 30) if swap_tables else Host()
    m = Machine(MachineSpec(name="explain", ram_mib=256, vcpus=1, mmu=mmu, mmio_caching=policy), host)
    os_ = GuestOS(m, OsParams(boot_console_bytes=0), seed=1)
    os_.boot()
    vcpu = m.vcpus[0]
    cpl = 0
    what = "an explicit address"
    if gva is None:
        where, dkind, dsize, what = TARGETS[target]
        kind = kind or dkind
        size = size or dsize
        if where == "@lapic":
            gva = FIXMAP_APIC + 0xB0
        elif where == "@ram":
            gva = DIRECT_MAP + (os_.slab[5] << 12) + 0x40
        elif where == "@user":
            mm = os_._new_mm(vcpu)
            os_._switch_mm(os_.cpus[0], mm)
            gva = USER_HEAP + (7 << 12)
            cpl = 3
            warm = 0
        else:
            gva = os_.ioremaps[where]
    kind = kind or "read"
    size = size or 4
    value = 0x1 if kind == "write" else None

    def once() -> Any:
        return vcpu.access(gva, size, kind, value, cpl=cpl)
    for _ in range(warm):
        once()
    if memslot_change:
        m.vm.set_user_memory_region(slot=9, guest_phys_addr=1 << 36, memory_size=1 << 20)
    if swap_tables:
        pages = [os_.kpgd, *[t for (lvl, key), t in os_.ktables.items()
                             if key == gva >> (12 + 9 * lvl)]]
        hpas = []
        for g in pages:
            slot = m.vm.memslots.spaces[0].search(g)
            assert slot is not None, f"guest page table at gfn {g:#x} outside RAM"   # the OS allocates them in RAM
            hpas.append(slot.gfn_to_hva(g) >> 12)
        host.swap_out_pages(hpas)
    lines = [f"kvmmu explain: a {size}-byte {kind} at gva {gva:#x}, CPL{cpl}: {what}",
             f"machine: default PC layout, 1 vCPU, {mmu} paging, MMIO policy {policy!r}; {warm} identical "
             f"access(es) before" + ("; then the VMM created a memslot" if memslot_change else "")
             + ("; then the host swapped out the guest's page-table pages" if swap_tables else ""), ""]
    lines.append(f"1. The guest's translation (CR3 = {vcpu.cr3:#x}), read from guest memory:")
    wl, gpa = _guest_walk(m.vm, vcpu.cr3, gva)
    lines += wl
    guest_steps = [f"CR3 {vcpu.cr3:#x}"] + [ln.strip() for ln in wl]
    if gpa is not None:
        slot = m.vm.memslots.spaces[0].search(gpa >> 12)
        dev = m.device_at(gpa)
        if slot is not None:
            lines.append(f"   gpa {gpa:#x} is RAM: memslot {slot.id} (gfn {slot.base_gfn:#x}+{slot.npages:#x}"
                         f"{', read-only' if slot.readonly else ''}{', dirty-logged' if slot.flags & 1 else ''})")
        else:
            lines.append(f"   gpa {gpa:#x} has no memslot: MMIO"
                         + (f" -> device {dev.name} ({dev.where})" if dev else " (no device: reads float)"))
    direct = m.vm.tdp_enabled
    key = gpa if direct and gpa is not None else gva
    lines += ["", f"2. KVM's {'EPT/NPT' if direct else 'shadow'} tables for "
                  f"{'gpa' if direct else 'gva'} {key if key is not None else gva:#x} before the access:"]
    tables_before = _kvm_tables(vcpu, key if key is not None else gva)
    lines += tables_before
    before = (dict(vcpu.stats), dict(vcpu.counters), dict(m.vm.stats))
    events: list[Any] = []
    m.vm.trace.subscribe(events.append)
    m.vm.trace.enable(capacity=10000)
    r = once()
    m.vm.trace.enabled = False
    d_stats = {k: v - before[0][k] for k, v in vcpu.stats.items() if v != before[0][k]}
    d_counters = {k: v - before[1][k] for k, v in vcpu.counters.items() if v != before[1][k]}
    d_vm = {k: v - before[2][k] for k, v in m.vm.stats.items() if v != before[2][k]}
    lines += ["", "3. The CPU: " + ("the TLB had the translation: no walk, no exit" if d_counters.get("tlb_hits")
                                    and not d_stats.get("exits") else
                                    f"TLB miss: the CPU walked KVM's tables ({d_counters.get('hw_walks', 0)} walk(s))")]
    lines += ["", "4. What KVM did, in order:"]
    if not events:
        lines.append("   nothing: the access never left the guest")
    for i, ev in enumerate(events, 1):
        lines.append(f"   {i:2}. {ev.name}: {format_event(ev.name, ev.fields)}")
        if ev.name in GLOSS:
            lines.append(f"       ({GLOSS[ev.name]})")
    lines += ["", "5. Path taken: " + _path(d_stats, d_counters, r, direct)]
    if r.fault is not None:
        lines.append(f"   the guest sees {r.fault}")
    elif kind != "write":
        lines.append(f"   the guest read {r.value:#x}")
    lines += ["", f"6. KVM's tables for {'gpa' if direct else 'gva'} {key if key is not None else gva:#x} after:"]
    tables_after = _kvm_tables(vcpu, key if key is not None else gva)
    lines += tables_after
    lines += ["", "7. Counters that moved:"]
    for title, d in (("KVM vCPU stats", d_stats), ("KVM VM stats", d_vm), ("model counters", d_counters)):
        lines.append(f"   {title}: " + (", ".join(f"{k} +{v}" if v > 0 else f"{k} {v}" for k, v in d.items())
                                         or "none"))
    if plot is not None:
        from .plot import plot_walk
        plot_walk(plot, lines[0].removeprefix("kvmmu explain: "), guest_steps,
                  [ln.strip() for ln in tables_before], [ln.strip() for ln in tables_after],
                  [f"{ev.name}: {format_event(ev.name, ev.fields)}" for ev in events],
                  _path(d_stats, d_counters, r, direct))
        lines.append(f"\n(picture written to {plot})")
    return "\n".join(lines) + "\n"


def _path(s: dict[str, int], c: dict[str, int], r: Any, direct: bool) -> str:
    if not s.get("exits"):
        return "no exit: the CPU completed it from the TLB / KVM's tables (native speed)"
    parts = []
    if s.get("pf_taken"):
        if c.get("mmio_fastpath_invalid"):
            parts.append("the fast path found a stale MMIO spte (old generation) -> the full fault path")
        else:
            parts.append("the full fault path (kvm_mmu_page_fault -> " + ("direct map" if direct else
                                                                           "guest walk + memslot lookup") + ")")
        if s.get("pf_mmio_spte_created"):
            parts.append("an MMIO spte was created")
        if s.get("pf_guest"):
            parts.append("a #PF was injected into the guest")
    elif c.get("mmio_fastpath"):
        parts.append("the MMIO fast path: a lockless walk of KVM's tables found an MMIO spte")
    elif c.get("mmio_cache_hits"):
        parts.append("the MMIO fast path: the per-vCPU MMIO cache answered")
    if s.get("insn_emulation"):
        parts.append("emulated")
    if c.get("userspace_exits"):
        parts.append(f"{c['userspace_exits']} KVM_EXIT_MMIO to the VMM")
    elif c.get("iobus_handled"):
        parts.append("completed by an in-kernel device")
    if r.fault is not None and not s.get("pf_guest"):
        parts.append("the guest's #PF was delivered by the CPU without KVM")
    return "; ".join(parts) or "an exit that KVM resolved by fixing its tables"
