"""Checks of kvmmu.real that need no /dev/kvm: ioctl encodings, struct sizes, the stats-fd parser,
the long-mode images.  Expected values come from the Linux UAPI definitions, recomputed here."""

from __future__ import annotations

import os
import struct
import tempfile

import pytest

from kvmmu.arch.descriptors import TSS_SEL, USER_CS, USER_DS, gdt_image, idt_gate, tss_image
from kvmmu.real import available, identity_map_2m, stats_delta, unavailable_reason
from kvmmu.real import device as device_module
from kvmmu.real import ioctls as K
from kvmmu.real.stats import StatsReader

# Linux include/uapi/asm-generic/ioctl.h: nr 8 bits at 0, type 8 bits at 8, size 14 bits at 16,
# direction 2 bits at 30; _IOC_WRITE = 1, _IOC_READ = 2.
_NONE, _WRITE, _READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int, type_: int = 0xAE) -> int:
    assert 0 <= nr < 1 << 8 and 0 <= size < 1 << 14
    return direction << 30 | size << 16 | type_ << 8 | nr


# (name, direction, nr, sizeof the argument struct as the UAPI header declares it)
IOCTLS = [
    ("KVM_GET_API_VERSION", _NONE, 0x00, 0),
    ("KVM_CREATE_VM", _NONE, 0x01, 0),
    ("KVM_GET_MSR_INDEX_LIST", _READ | _WRITE, 0x02, 4),      # struct kvm_msr_list {u32 nmsrs}
    ("KVM_CHECK_EXTENSION", _NONE, 0x03, 0),
    ("KVM_GET_VCPU_MMAP_SIZE", _NONE, 0x04, 0),
    ("KVM_GET_SUPPORTED_CPUID", _READ | _WRITE, 0x05, 8),     # struct kvm_cpuid2 {u32 nent, pad}
    ("KVM_CREATE_VCPU", _NONE, 0x41, 0),
    ("KVM_GET_DIRTY_LOG", _WRITE, 0x42, 16),                  # {u32 slot, pad, u64 bitmap}
    ("KVM_SET_USER_MEMORY_REGION", _WRITE, 0x46, 32),         # {u32 slot, flags; u64 gpa, size, hva}
    ("KVM_REGISTER_COALESCED_MMIO", _WRITE, 0x67, 16),        # {u64 addr; u32 size, pio}
    ("KVM_UNREGISTER_COALESCED_MMIO", _WRITE, 0x68, 16),
    ("KVM_IOEVENTFD", _WRITE, 0x79, 64),                      # {u64 datamatch, addr; u32 len; s32 fd;
                                                              #  u32 flags; u8 pad[36]}
    ("KVM_RUN", _NONE, 0x80, 0),
    ("KVM_GET_REGS", _READ, 0x81, 18 * 8),                    # 18 x u64
    ("KVM_SET_REGS", _WRITE, 0x82, 18 * 8),
    ("KVM_GET_SREGS", _READ, 0x83, 8 * 24 + 2 * 16 + 7 * 8 + 4 * 8),  # segs, dtables, crs, bitmap
    ("KVM_SET_SREGS", _WRITE, 0x84, 8 * 24 + 2 * 16 + 7 * 8 + 4 * 8),
    ("KVM_TRANSLATE", _READ | _WRITE, 0x85, 8 + 8 + 3 + 5),   # {u64 linear, phys; u8 x3; u8 pad[5]}
    ("KVM_GET_MSRS", _READ | _WRITE, 0x88, 8),                # struct kvm_msrs {u32 nmsrs, pad}
    ("KVM_SET_MSRS", _WRITE, 0x89, 8),
    ("KVM_SET_CPUID2", _WRITE, 0x90, 8),
    ("KVM_SET_GUEST_DEBUG", _WRITE, 0x9B, 4 + 4 + 8 * 8),     # {u32 control, pad; u64 debugreg[8]}
    ("KVM_GET_VCPU_EVENTS", _READ, 0x9F, 64),
    ("KVM_SET_VCPU_EVENTS", _WRITE, 0xA0, 64),
    ("KVM_ENABLE_CAP", _WRITE, 0xA3, 4 + 4 + 4 * 8 + 64),     # {u32 cap, flags; u64 args[4]; u8 pad[64]}
    ("KVM_GET_STATS_FD", _NONE, 0xCE, 0),
]


def test_available_returns_a_bool() -> None:
    """available() answers True or False (never raises), with a reason whenever it is False."""
    result = available()
    assert isinstance(result, bool)
    assert (unavailable_reason() is None) == result


def test_available_is_false_without_dev_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /dev/kvm is absent, available() is False and the reason names the device."""
    monkeypatch.setattr(device_module, "KVM_DEVICE", "/nonexistent/kvm")
    monkeypatch.setattr(device_module, "_probe_result", [])
    assert available() is False
    reason = unavailable_reason()
    assert reason is not None and "/nonexistent/kvm" in reason


@pytest.mark.parametrize(("name", "direction", "nr", "size"), IOCTLS, ids=[i[0] for i in IOCTLS])
def test_ioctl_number_is_the_ioc_encoding(name: str, direction: int, nr: int, size: int) -> None:
    """Each ioctl number is _IOC(direction, 0xAE, nr, sizeof(arg)) as in linux/kvm.h."""
    assert getattr(K, name) == _ioc(direction, nr, size)


@pytest.mark.parametrize(("layout", "size"), [
    (K.KVM_REGS, 144), (K.KVM_USERSPACE_MEMORY_REGION, 32), (K.KVM_DIRTY_LOG, 16),
    (K.KVM_TRANSLATION, 24), (K.KVM_GUEST_DEBUG, 72), (K.KVM_ENABLE_CAP_STRUCT, 104),
    (K.KVM_VCPU_EVENTS, 64), (K.KVM_SEGMENT, 24), (K.KVM_DTABLE, 16), (K.KVM_MSR_ENTRY, 16),
    (K.KVM_CPUID_ENTRY2, 40), (K.KVM_COALESCED_MMIO_ZONE, 16), (K.KVM_IOEVENTFD_STRUCT, 64),
])
def test_struct_layout_sizes(layout: struct.Struct, size: int) -> None:
    """The struct layouts have the sizes the ioctl encodings promise the kernel."""
    assert layout.size == size


def test_sregs_field_offsets() -> None:
    """kvm_sregs: gdt at 192, idt at 208, cr0 at 224, 312 bytes in all."""
    assert (K.SREGS_GDT_OFFSET, K.SREGS_IDT_OFFSET, K.SREGS_CONTROL_OFFSET) == (192, 208, 224)
    assert K.KVM_SREGS_SIZE == 312


def test_regs_order_puts_rsp_at_offset_48() -> None:
    """kvm_regs: rsp is the 7th u64 (offset 48), rip at 128, rflags at 136."""
    assert 8 * K.REG_NAMES.index("rsp") == 48
    assert 8 * K.REG_NAMES.index("rip") == 128 and 8 * K.REG_NAMES.index("rflags") == 136


def _stats_file(tmp_dir: str) -> int:
    """A stats fd image built by hand from the documented layout (header, id, descriptors, data)."""
    name_size = 48
    descs = [  # flags, exponent, size, offset, bucket_size, name
        (4 | 2 << 4, -9, 4, 16, 0, b"halt_wait_hist"),   # log_hist, seconds, 4 buckets at +16
        (0, 0, 1, 8, 0, b"pf_taken"),                     # cumulative at +8
        (2, 0, 1, 0, 0, b"max_mmu_rmap_size"),           # peak at +0
    ]
    id_offset = 24
    desc_offset = id_offset + name_size
    data_offset = desc_offset + len(descs) * (16 + name_size)
    blob = struct.pack("<6I", 0, name_size, len(descs), id_offset, desc_offset, data_offset)
    blob += b"kvm-1234".ljust(name_size, b"\0")
    for flags, exp, size, offset, bucket, name in descs:
        blob += struct.pack("<IhHII", flags, exp, size, offset, bucket) + name.ljust(name_size, b"\0")
    blob += struct.pack("<6Q", 5, 7, 1, 2, 3, 4)
    path = os.path.join(tmp_dir, "stats")
    with open(path, "wb") as f:
        f.write(blob)
    return os.open(path, os.O_RDONLY)


def test_stats_reader_parses_header_descriptors_and_data() -> None:
    """A stats fd is parsed by its header: names from descriptors, u64 values at data+offset."""
    with tempfile.TemporaryDirectory() as tmp:
        reader = StatsReader(_stats_file(tmp))
        try:
            assert reader.id == "kvm-1234"
            assert reader.snapshot() == {"halt_wait_hist": (1, 2, 3, 4), "pf_taken": 7,
                                         "max_mmu_rmap_size": 5}
            hist = reader.descriptors["halt_wait_hist"]
            assert (hist.type, hist.unit, hist.exponent, hist.size) == ("log_hist", "seconds", -9, 4)
            assert reader.descriptors["max_mmu_rmap_size"].type == "peak"
        finally:
            reader.close()


def test_stats_delta_subtracts_counters_and_histogram_buckets() -> None:
    """stats_delta gives after - before per name and per bucket; nonzero=True drops unchanged."""
    before = {"pf_taken": 3, "exits": 10, "hist": (1, 1)}
    after = {"pf_taken": 5, "exits": 10, "hist": (1, 4), "new": 2}
    assert stats_delta(before, after) == {"pf_taken": 2, "exits": 0, "hist": (0, 3), "new": 2}
    assert stats_delta(before, after, nonzero=True) == {"pf_taken": 2, "hist": (0, 3), "new": 2}


def test_gdt_image_has_the_documented_descriptors() -> None:
    """GDT: 64-bit code 0x00209A0000000000 at 0x08, data 0x00CF92000000FFFF at 0x10, DPL3 code
    0x0020FA0000000000 at 0x23, DPL3 data 0x00CFF2000000FFFF at 0x2b, a 64-bit TSS at 0x30."""
    img = gdt_image(0x1234_5678_9ABC)
    entry = lambda sel: struct.unpack_from("<Q", img, sel & ~7)[0]  # noqa: E731
    assert entry(0x08) == 0x00209A0000000000
    assert entry(0x10) == 0x00CF92000000FFFF
    assert entry(USER_CS) == 0x0020FA0000000000
    assert entry(USER_DS) == 0x00CFF2000000FFFF
    low, high = struct.unpack_from("<QQ", img, TSS_SEL)
    base = (low >> 16 & 0xFFFFFF) | (low >> 56 & 0xFF) << 24 | high << 32
    assert base == 0x1234_5678_9ABC
    assert low >> 40 & 0xFF == 0x89 and low & 0xFFFF == 0x67


def test_tss_image_puts_rsp0_at_offset_4() -> None:
    """64-bit TSS: RSP0 at +4, 104 bytes."""
    img = tss_image(0xA000)
    assert len(img) == 104 and struct.unpack_from("<Q", img, 4)[0] == 0xA000


def test_idt_gate_encoding() -> None:
    """An interrupt gate: offset split 15:0 / 31:16 / 63:32, selector 8, type 0x8E."""
    gate = idt_gate(0x1122_3344_5566_7788)
    lo16, sel, ist, attr, mid16, hi32, _ = struct.unpack("<HHBBHII", gate)
    assert (lo16, sel, ist, attr, mid16, hi32) == (0x7788, 8, 0, 0x8E, 0x5566, 0x11223344)


@pytest.mark.parametrize("va", [0, 0x40000, 0x3FFF_FFFF, 0xD000_1234, 0xFFFF_FFFF])
def test_identity_map_translates_addresses_to_themselves(va: int) -> None:
    """Walking the 4-level image (PML4 -> PDPT -> PD with PS) maps every VA below 4 GiB to itself."""
    base = 0x10000
    img = identity_map_2m(base, 4 << 30)
    read = lambda gpa: struct.unpack_from("<Q", img, gpa - base)[0]  # noqa: E731
    pml4e = read(base + 8 * (va >> 39 & 511))
    pdpte = read((pml4e & ~0xFFF) + 8 * (va >> 30 & 511))
    pde = read((pdpte & ~0xFFF) + 8 * (va >> 21 & 511))
    assert pml4e & 7 == 7 and pdpte & 7 == 7 and pde & 0x87 == 0x87
    assert (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (va & 0x1FFFFF) == va
