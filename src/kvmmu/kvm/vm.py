"""The VM: memslots, vCPUs, the MMU shared by all of them, the io bus and the VMM's MMIO handler.

    vm = VM(mmu="shadow", mmio_caching="generation")
    vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=64 << 20)
    vcpu = vm.create_vcpu()
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..arch.index import gpa_to_gfn
from ..errors import InvalidArgument, MemslotError
from ..hw.host import Host
from ..hw.vmm_space import VmmAddressSpace
from .audit import audit_vm
from .emulate import MmioExit
from .iobus import CoalescedMmio, IoBus, IoDevice
from .ioeventfd import IoEventFd, check_ioeventfd
from .memslots import KVM_MEM_LOG_DIRTY_PAGES, Memslot, Memslots
from .mmu.mmu import KvmMmu
from .mmu.spte import TODAY_GEN_LAYOUT, MmioGenLayout, ept_masks, shadow_masks
from .mmu.tdp_mmu import TdpMmu
from .mmu_notifier import KvmMmuNotifier
from .params import DEFAULT_MMIO_CACHING, DEFAULT_MMU, KvmParams, resolve
from .stats import VM_STATS, Stats, delta
from .trace import Trace
from .vcpu import Vcpu

MMU_FLAVOURS = ("shadow", "ept", "npt")
MMIO_POLICIES = ("off", "zap", "generation")
MmioHandler = Callable[[MmioExit], int | bytes | None]


def _check_gen_layout(layout: object) -> None:
    """The generation lives in spte bits no MMIO spte uses otherwise: above the low access and
    present bits (2:0), below the software-present bit 11, and above the gfn (51:12) but below bit 63
    (SPTE_MMIO_ALLOWED_MASK); each range is non-empty."""
    if not isinstance(layout, MmioGenLayout):
        raise InvalidArgument("mmio_gen_layout", layout, "an MMIO generation layout is a MmioGenLayout (or None)")
    fields = (layout.low_start, layout.low_end, layout.high_start, layout.high_end)
    if any(type(f) is not int for f in fields) or not (3 <= layout.low_start <= layout.low_end <= 10
                                                         and 52 <= layout.high_start <= layout.high_end <= 62):
        raise InvalidArgument("mmio_gen_layout", layout, "generation bits lie in 3 <= low_start <= low_end <= 10 "
                              "and 52 <= high_start <= high_end <= 62")


def kvm_mmu_max_gfn(vm: VM) -> int:
    """The largest gfn a memslot may reach (kvm_arch_prepare_memory_region checks kvm_mmu_max_gfn).

    Shadow paging maps any 52-bit gpa (the gfn lives only in the shadow page, never in an spte).
    EPT/NPT cannot map a gpa beyond the host's MAXPHYADDR (kvm_mmu_max_gfn uses shadow_phys_bits),
    nor beyond what a `tdp_level`-level table translates (48 bits for 4 levels): a slot there would
    be indexed modulo 2^48 and alias gpa 0's entries.  (KVM picks 5-level TDP whenever the guest's
    MAXPHYADDR exceeds 48 and the hardware has it, kvm_mmu_get_tdp_level, so it never meets the second
    limit; the model lets a caller choose `tdp_level=4` with any MAXPHYADDR.)
    """
    if not vm.tdp_enabled:
        return (1 << (52 - 12)) - 1
    return (1 << (min(vm.host.maxphyaddr, 12 + 9 * vm.tdp_level) - 12)) - 1


class VM:
    """A KVM virtual machine on a modelled host."""

    def __init__(self, mmu: str = DEFAULT_MMU, mmio_caching: str = DEFAULT_MMIO_CACHING, *, host: Host | None = None,
                 address_spaces: int = 2, initial_generation: int = 0, guest_maxphyaddr: int = 46,
                 guest_gbpages: bool = True, max_mmu_pages: int | None = None,
                 mmio_gen_layout: MmioGenLayout | None = None, tdp_level: int = 4,
                 host_hugepage_level: int = 1, ept_ad: bool = True, mmio_log_size: int = 10_000,
                 kvm_deviations: bool = False, tdp_mmu: bool | None = None,
                 params: KvmParams | None = None, pku: bool | None = None,
                 retry_pf_emulation: bool = False) -> None:
        """`mmu` is "shadow" (the default), "ept" or "npt"; `mmio_caching` "generation" (the default),
        "zap" or "off".  `tdp_mmu` (default True) runs EPT/NPT on KVM's TDP MMU, False on the legacy
        MMU; `params` gives the same choices as KVM's module parameters (kvmmu.KvmParams).

        `kvm_deviations=True` reproduces the places where KVM knowingly departs from the SDM in a way
        a guest can see (docs/architecture/deviations.md, "Where KVM lets a guest tell"); by default the model
        follows the SDM there, so that a guest can never tell.

        `pku`: whether the vCPUs have protection keys (CPUID.7.0:ECX.PKU); without them CR4.PKE is a
        reserved bit.  None: they have, except under shadow paging with `kvm_deviations`, because
        KVM's kvm_set_cpu_caps offers PKU only with TDP (docs/architecture/kvm-mmu.md, "Protection keys").

        `retry_pf_emulation=True` is KVM before 6.12: an instruction the fault path would emulate
        (a write to a read-only memslot, say) is first unprotected and retried once unless it is
        one that writes page tables (kvm/emulate_retry.py); the default is today's KVM, which
        retries only for a write-protected guest page table and does not model that either."""
        mmu, mmio_caching, tdp_mmu = resolve(mmu, mmio_caching, tdp_mmu, params)
        if mmu not in MMU_FLAVOURS:
            raise InvalidArgument("mmu", mmu, f"the MMU flavour is one of {MMU_FLAVOURS}")
        if mmio_caching not in MMIO_POLICIES:
            raise InvalidArgument("mmio_caching", mmio_caching, f"the MMIO policy is one of {MMIO_POLICIES}")
        if type(address_spaces) is not int or address_spaces not in (1, 2):
            raise InvalidArgument("address_spaces", address_spaces, "x86 KVM has 1 or 2 (SMM) address spaces")
        if type(initial_generation) is not int or initial_generation < 0 or initial_generation >> 62 \
                or initial_generation % address_spaces:
            raise InvalidArgument("initial_generation", initial_generation,
                                  "a generation is a non-negative multiple of the number of address spaces")
        if type(guest_maxphyaddr) is not int or not 32 <= guest_maxphyaddr <= 52:
            raise InvalidArgument("guest_maxphyaddr", guest_maxphyaddr, "MAXPHYADDR is between 32 and 52")
        if not isinstance(host, (Host, type(None))):
            raise InvalidArgument("host", host, "host must be a kvmmu.Host")
        if max_mmu_pages is not None and (type(max_mmu_pages) is not int or max_mmu_pages < 64):
            raise InvalidArgument("max_mmu_pages", max_mmu_pages, "the shadow-page quota is an int of at least 64")
        if type(tdp_level) is not int or tdp_level not in (4, 5):
            raise InvalidArgument("tdp_level", tdp_level, "TDP tables have 4 or 5 levels")
        if type(host_hugepage_level) is not int or host_hugepage_level not in (1, 2, 3):
            raise InvalidArgument("host_hugepage_level", host_hugepage_level, "1 (4 KiB), 2 (2 MiB) or 3 (1 GiB)")
        if pku is not None and type(pku) is not bool:
            raise InvalidArgument("pku", pku, "pku is True, False or None (the flavour's default)")
        for name, flag in (("kvm_deviations", kvm_deviations), ("guest_gbpages", guest_gbpages), ("ept_ad", ept_ad),
                           ("retry_pf_emulation", retry_pf_emulation)):
            if type(flag) is not bool:
                raise InvalidArgument(name, flag, f"{name} is True or False")
        if type(mmio_log_size) is not int or mmio_log_size < 0 or mmio_log_size >> 32:
            raise InvalidArgument("mmio_log_size", mmio_log_size, "the MMIO log keeps between 0 and 2^32-1 exits")
        if mmio_gen_layout is not None:
            _check_gen_layout(mmio_gen_layout)
        self.host = host if host is not None else Host()
        self.kvm_deviations = kvm_deviations
        self.retry_pf_emulation = retry_pf_emulation
        self.flavour = mmu
        self.mmio_caching = mmio_caching
        self.tdp_enabled = mmu != "shadow"
        self.tdp_mmu_enabled = self.tdp_enabled and tdp_mmu
        self.pku = pku if pku is not None else self.tdp_enabled or not kvm_deviations
        self.tdp_level = tdp_level
        self.guest_maxphyaddr = guest_maxphyaddr
        self.guest_gbpages = guest_gbpages
        self.host_hugepage_level = host_hugepage_level
        self.stats = Stats(VM_STATS)
        self.trace = Trace()
        gen = None if mmio_caching == "zap" else (mmio_gen_layout or TODAY_GEN_LAYOUT)
        caching = mmio_caching != "off"
        if mmu == "ept":
            masks = ept_masks(self.host.maxphyaddr, gen, caching, ad=ept_ad)
        else:
            masks = shadow_masks(self.host.maxphyaddr, gen, caching)
        self.memslots = Memslots(address_spaces, initial_generation, max_gfn=kvm_mmu_max_gfn(self))
        self.memslots.on_flush_slot = self._flush_shadow_memslot
        self.memslots.on_updated = self._memslots_updated
        self.mmu = KvmMmu(self, masks, max_mmu_pages)
        if self.tdp_mmu_enabled:
            self.mmu.tdp_mmu = TdpMmu(self.mmu)
        vendor = {"ept": "intel", "npt": "amd"}.get(mmu, params.vendor if params is not None else "intel")
        # What /sys/module/*/parameters would read for this VM: enable_mmio_caching is cleared by KVM when
        # the host leaves no bits for MMIO sptes (kvm_mmu_set_mmio_spte_mask).
        self.params = KvmParams(tdp_mmu=self.tdp_mmu_enabled, mmio_caching=masks.mmio_enabled,
                                ept=mmu == "ept" if vendor == "intel" else True,
                                npt=mmu == "npt" if vendor == "amd" else True, vendor=vendor)
        self.vcpus: list[Vcpu] = []
        self.iobus = IoBus()
        self.fast_mmio_bus = IoBus()          # KVM_FAST_MMIO_BUS: length-0 ioeventfds, consulted by VMX only
        self.fast_mmio = mmu == "ept"         # handle_ept_misconfig tries it; SVM's #NPF path has none
        self.coalesced_ring: deque = deque()
        self._mmio_handler: MmioHandler | None = None
        self.mmio_log: deque[MmioExit] = deque(maxlen=mmio_log_size)   # the most recent exits only
        self._vmm_space = VmmAddressSpace(self.host, *self.host.new_vmm_region())
        self._fresh: dict[int, tuple[int, int]] = {}        # slot -> the VMM's fresh mapping for it
        self._alias_key: tuple[int, ...] = ()
        self._aliased = False
        self.mmu_notifier = KvmMmuNotifier(self)
        self.host.register_mmu_notifier(self.mmu_notifier)

    @property
    def effective(self) -> dict[str, int | bool]:
        """What KVM made of the parameters on this host: `enable_mmio_caching` (off when the policy is
        "off" or no reserved PA bit is left for the MMIO marker, kvm_mmu_set_mmio_spte_mask),
        `mmio_max_gfn` (the largest gfn an MMIO spte holds; MMIO above it is emulated uncached) and
        `max_gfn` (kvm_mmu_max_gfn: memslots must end at or below it)."""
        masks = self.mmu.masks
        return {"enable_mmio_caching": masks.mmio_enabled, "mmio_max_gfn": masks.mmio_max_gfn,
                "max_gfn": self.memslots.max_gfn, "tdp_level": self.tdp_level if self.tdp_enabled else 0}

    @property
    def mmio_handler(self) -> MmioHandler | None:
        """The VMM's KVM_EXIT_MMIO handler: called with each MmioExit; for a read it answers an int
        (truncated to the access size, as KVM copies only `len` bytes of kvm_run.mmio.data), bytes (the
        first `len`, zero-padded) or None (nothing there: all ones).  None as the handler: no VMM device."""
        return self._mmio_handler

    @mmio_handler.setter
    def mmio_handler(self, handler: MmioHandler | None) -> None:
        if handler is not None and not callable(handler):
            raise InvalidArgument("mmio_handler", handler, "the MMIO handler is a callable taking an MmioExit, or None")
        self._mmio_handler = handler

    # -- memslots ---------------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int, flags: int = 0,
                               userspace_addr: int | None = None,
                               during_update: Callable[[], None] | None = None) -> None:
        """KVM_SET_USER_MEMORY_REGION.  Without userspace_addr the VMM maps fresh anonymous memory.

        `during_update` runs while the new memslots are published but the generation still carries
        the update-in-progress flag (what a vCPU racing with the ioctl would see).
        """
        if during_update is not None and not callable(during_update):
            raise InvalidArgument("during_update", during_update, "must be a callable (or None)")
        fresh = userspace_addr is None
        space = self._vmm_space
        if userspace_addr is None:
            old = None
            if isinstance(slot, int) and not isinstance(slot, bool) and slot >= 0:
                old = self.memslots.slot(slot & 0xFFFF, min(slot >> 16, self.memslots.nr_as - 1))
            # A new slot's mapping is made only once the ioctl is known to succeed (nothing half-applied).
            userspace_addr = old.userspace_addr if old is not None else space.start
        change, old = self.memslots.validate(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        if fresh and change == "create":
            in_use = [(s.userspace_addr, s.userspace_addr + (s.npages << 12)) for s in self.memslots.all_slots()]
            if self.host.anon_offset is None or self.host_hugepage_level == 3:
                hva = space.mmap(memory_size, in_use, align=self._thp_align(memory_size))
            else:
                hva = space.mmap(memory_size, in_use, align=1 << 21, offset=self.host.anon_offset)
            if hva is None:
                raise MemslotError("memory_size", memory_size,
                                   f"the VMM cannot map that much fresh memory: the largest free range of its "
                                   f"address space is {space.largest_free():#x} bytes")
            userspace_addr = hva
            self._fresh[slot] = (hva, memory_size)
        elif memory_size and not space.start <= userspace_addr <= space.end - memory_size:
            raise MemslotError("userspace_addr", userspace_addr,
                               f"must lie in this VMM's address space [{space.start:#x}, {space.end:#x})")
        if change == "none":
            return
        policy_zap = self.mmio_caching == "zap" and change in ("create", "move")
        # A racing vCPU cannot abort the ioctl: if `during_update` raises, the update still completes
        # (generation, zaps, write protection) and only then is its exception passed on.
        raised: list[BaseException] = []
        during: Callable[[], None] | None = None
        if during_update is not None:
            def during() -> None:
                try:
                    during_update()
                except BaseException as err:
                    raised.append(err)
        new = self.memslots.apply(change, slot, flags, guest_phys_addr, memory_size, userspace_addr, old, during)
        if policy_zap:
            # 2011: no generation in MMIO sptes, so any new or moved slot zaps every shadow page.
            self.mmu.zap_all()
        if change == "flags" and new is not None and old is not None and new.flags & KVM_MEM_LOG_DIRTY_PAGES and \
                not old.flags & KVM_MEM_LOG_DIRTY_PAGES:
            self._write_protect_slot(new)
        self.trace.emit("memslot_update", slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
                        memory_size=memory_size, change=change)
        if change == "delete":
            self._release_fresh(slot)
        if raised:
            raise raised[0]

    def _release_fresh(self, deleted: int) -> None:
        """A deleted slot's fresh mapping goes back to the VMM's address space (see VmmAddressSpace)."""
        if deleted in self._fresh:
            self._vmm_space.release(*self._fresh.pop(deleted))

    def memslots_alias(self) -> bool:
        """Whether two live memslots map one host page (cached per memslot generation)."""
        key = tuple([space.generation for space in self.memslots.spaces])   # (per fault: no generator)
        if self._alias_key != key:
            ranges = sorted((s.userspace_addr, s.userspace_addr + (s.npages << 12)) for s in self.memslots.all_slots())
            self._aliased = any(a[1] > b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            self._alias_key = key
        return self._aliased

    def _flush_shadow_memslot(self, slot: Memslot) -> None:
        """kvm_arch_flush_shadow_memslot with the default quirk: zap everything, fast."""
        self.mmu.zap_all_fast()

    def _memslots_updated(self, as_id: int, gen: int) -> None:
        """kvm_mmu_invalidate_mmio_sptes: only a wrap of the spte's generation field needs a zap."""
        masks = self.mmu.masks
        if masks.gen is None:
            return
        g = gen & masks.gen.mask & ~(self.memslots.nr_as - 1)
        if g == 0:
            self.trace.emit("mmio_generation_wrap", gen=gen)
            self.mmu.zap_all_fast()

    def _write_protect_slot(self, slot: Memslot) -> None:
        changed = self.mmu.tdp_mmu is not None and self.mmu.tdp_mmu.wrprot_slot(slot)
        for gfn in range(slot.base_gfn, slot.end_gfn):
            if (slot.as_id, gfn) in self.mmu.rmap:
                changed |= self.mmu.write_protect_gfn(gfn, slot.as_id, for_dirty_log=True)
        if changed:
            self.mmu.flush_remote_tlbs()

    def get_dirty_log(self, slot: int) -> set[int]:
        """KVM_GET_DIRTY_LOG: page indexes dirtied since the last call; re-arms write protection."""
        s = None
        if type(slot) is int and slot >= 0 and slot >> 16 < self.memslots.nr_as:
            s = self.memslots.slot(slot & 0xFFFF, slot >> 16)
        if s is None:
            raise InvalidArgument("slot", slot, "KVM_GET_DIRTY_LOG needs an existing slot")
        if not s.flags & KVM_MEM_LOG_DIRTY_PAGES:
            raise InvalidArgument("slot", slot, "dirty logging (KVM_MEM_LOG_DIRTY_PAGES) is off for this slot")
        dirty, s.dirty_bitmap = set(s.dirty_bitmap), set()
        changed = self.mmu.tdp_mmu is not None and self.mmu.tdp_mmu.clear_dirty_pt_masked(
            s, sorted(s.base_gfn + i for i in dirty))
        for index in dirty:
            changed |= self.mmu.write_protect_gfn(s.base_gfn + index, s.as_id, for_dirty_log=True)
        if changed:
            self.mmu.flush_remote_tlbs()
        return dirty

    def mark_page_dirty(self, slot: Memslot, gfn: int) -> None:
        if slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            slot.dirty_bitmap.add(gfn - slot.base_gfn)

    # -- the VMM's view of guest RAM (its mmap) -------------------------------------------------------
    def _phys_pieces(self, gpa: int, length: int) -> list[tuple[int, int]]:
        if type(gpa) is not int or gpa < 0:
            raise InvalidArgument("gpa", gpa, "a guest-physical address is a non-negative integer")
        if type(length) is not int or length < 0:
            raise InvalidArgument("length", length, "a length is a non-negative integer")
        out = []
        while length:
            slot = self.memslots.spaces[0].search(gpa_to_gfn(gpa))
            if slot is None or slot.invalid:
                raise InvalidArgument("gpa", gpa, "no memslot backs this guest-physical address")
            n = min(length, 0x1000 - (gpa & 0xFFF))
            out.append((slot.gfn_to_hva(gpa_to_gfn(gpa)) | (gpa & 0xFFF), n))
            gpa += n
            length -= n
        return out

    def write_phys(self, gpa: int, data: bytes | bytearray) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument("data", data, "write_phys takes bytes")
        pieces = self._phys_pieces(gpa, len(data))
        pos = 0
        for hva, n in pieces:
            self._anon_fault(hva, True)               # the VMM's store allocates (or COWs) the page
            self.host.mem.write_bytes(hva, data[pos:pos + n])
            pos += n

    def _thp_align(self, memory_size: int) -> int:
        """The alignment of the VMM's next anonymous mapping: on huge host pages Linux aligns a mapping
        at least one huge page long to the huge page size (thp_get_unmapped_area)."""
        for level in range(self.host_hugepage_level, 1, -1):
            size = 1 << (12 + 9 * (level - 1))
            if type(memory_size) is int and memory_size >= size:
                return size
        return 4096

    def read_phys(self, gpa: int, length: int) -> bytes:
        return b"".join(self.host.mem.read_bytes(hva, n) for hva, n in self._phys_pieces(gpa, length))

    def read_guest_quiet(self, gpa: int, size: int) -> int:
        """A read by KVM itself that the model does not count (e.g. re-reading a just-written gpte)."""
        slot = self.memslots.spaces[0].search(gpa_to_gfn(gpa))
        if slot is None:
            return 0
        return self.host.mem.read(slot.gfn_to_hva(gpa_to_gfn(gpa)) | (gpa & 0xFFF), size)

    def host_touch(self, hva: int, write: bool = False) -> bool:
        """KVM (or the VMM) reads or writes host page `hva`, sleeping if it must: a swapped-out page
        is faulted back in, a never-written page of lazy memory gets the zero page (read) or a page of
        its own (write).  True if the write copied the zero page (the MMU notifier ran)."""
        host = self.host
        cow = self._anon_fault(hva, write)
        if host.memory_limit is None:
            return cow
        if host.touch(hva >> 12):
            # KVM (get_user_pages / copy_from_user) slept on a swap-in of this host page.
            vcpu_id = self.trace.current_vcpu
            if 0 <= vcpu_id < len(self.vcpus):
                self.vcpus[vcpu_id].counters["host_swapins"] += 1
            self.trace.emit("host_swapin", hva=hva & ~0xFFF)
        if host.over_limit():
            host.reclaim(keep=hva >> 12)      # swap out the coldest pages; the mmu notifier zaps their sptes first
        return cow

    def _anon_fault(self, hva: int, write: bool) -> bool:
        """Host.anon_fault on the host page that backs hva: with host_hugepage_level 2 a transparent
        huge page when the 2 MiB frame lies inside one slot's mapping; with 3 (hugetlbfs) a page that
        any touch allocates, as hugetlbfs has no zero page."""
        host = self.host
        if host.prealloc:
            return False
        if self.host_hugepage_level == 3:
            return host.anon_fault(hva >> 12, True)
        if self.host_hugepage_level == 2:
            base = hva & ~0x1FFFFF
            if any(s.userspace_addr <= base and base + 0x200000 <= s.userspace_addr + (s.npages << 12)
                   for s in self.memslots.all_slots()):
                return host.anon_fault(hva >> 12, write, span=512)
        return host.anon_fault(hva >> 12, write)

    def host_resident(self, hva: int) -> bool:
        """The host page can be read without sleeping (kvm_vcpu_read_guest_atomic succeeds)."""
        return self.host.is_present(hva >> 12, False)

    def host_writable(self, hva: int) -> bool:
        """The host page is present and writable: what KVM's prefetch (get_user_pages_fast_only with
        FOLL_WRITE) and hva_to_pfn's fast path take."""
        return self.host.is_present(hva >> 12, True)

    # -- vCPUs, devices, the VMM ---------------------------------------------------------------------
    def create_vcpu(self) -> Vcpu:
        vcpu = Vcpu(self, len(self.vcpus))
        self.vcpus.append(vcpu)
        return vcpu

    def request_all(self, req: str) -> None:
        for v in self.vcpus:
            v.requests.add(req)

    def register_io_device(self, addr: int, length: int, device: IoDevice) -> None:
        """An in-kernel device on KVM_MMIO_BUS (ioeventfd, in-kernel LAPIC/IOAPIC/HPET...): an object with
        read(addr, length) -> int | None and write(addr, length, value) -> bool (see IoDevice)."""
        self.iobus.register(addr, length, device)

    def ioeventfd(self, addr: int, length: int = 0, datamatch: int | None = None,
                  on_signal: Callable[[int, int, int], None] | None = None) -> IoEventFd:
        """KVM_IOEVENTFD (MMIO): writes at `addr` signal the returned eventfd in the kernel, no exit.
        Length 0 matches any write size and also registers on KVM_FAST_MMIO_BUS (see kvm/ioeventfd.py);
        `datamatch` (KVM_IOEVENTFD_FLAG_DATAMATCH) needs a length."""
        check_ioeventfd(addr, length, datamatch, on_signal)
        fd = IoEventFd(addr, length, datamatch, on_signal)
        self.iobus.register(addr, length, fd)
        if not length:
            self.fast_mmio_bus.register(addr, 0, fd)
        return fd

    def register_coalesced_mmio(self, addr: int, size: int) -> None:
        """KVM_REGISTER_COALESCED_MMIO: writes inside the zone are queued in the ring, no exit."""
        self.iobus.register(addr, size, CoalescedMmio(self.coalesced_ring))

    def vmm_mmio(self, vcpu: Vcpu, gpa: int, length: int, is_write: bool, data: bytes) -> MmioExit:
        """One KVM_EXIT_MMIO round trip to userspace (the VMM drains the coalesced ring first)."""
        vcpu.counters["userspace_exits"] += 1
        self.coalesced_ring.clear()
        exit_ = MmioExit(gpa, length, is_write, data)
        trace = self.trace
        if trace.enabled:
            # write_mmio traces the write, read_exit_mmio the read still to be satisfied; then KVM_RUN
            # returns KVM_EXIT_MMIO to the VMM.
            trace.emit("kvm_mmio", type=2 if is_write else 0, len=length, gpa=gpa,
                       val=int.from_bytes(data, "little") if is_write else 0)
            trace.emit("kvm_userspace_exit", reason=6, errno=0)
        reply = self._mmio_handler(exit_) if self._mmio_handler is not None else None
        if not is_write:
            if not isinstance(reply, (int, bytes, bytearray, memoryview, type(None))):
                # The VMM's bug, found mid-access (as its own exception would be): the access is cut short.
                raise InvalidArgument("mmio_handler reply", reply,
                                      "the reply to a KVM_EXIT_MMIO read is an int, bytes or None")
            if isinstance(reply, (bytes, bytearray, memoryview)):
                value = int.from_bytes(bytes(reply)[:length].ljust(length, b"\0"), "little")
            elif isinstance(reply, int):
                value = reply
            else:
                value = (1 << (8 * length)) - 1      # nothing there: the bus floats to all ones
            exit_.data = (value & ((1 << (8 * length)) - 1)).to_bytes(length, "little")
        self.mmio_log.append(exit_)
        if trace.enabled and not is_write:
            # complete_emulated_mmio, back in KVM_RUN: the read now has its data.
            trace.emit("kvm_mmio", type=1, len=length, gpa=gpa, val=int.from_bytes(exit_.data, "little"))
        return exit_

    # -- reporting ---------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {"vm": self.stats.snapshot()}
        for v in self.vcpus:
            out[f"vcpu{v.id}"] = v.stats.snapshot()
            out[f"vcpu{v.id}.model"] = v.counters.snapshot()
        return out

    @staticmethod
    def delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        return {k: delta(before.get(k, {}), v) for k, v in after.items()}

    def audit(self) -> None:
        audit_vm(self)
