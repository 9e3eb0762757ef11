"""Python views of the vCPU structs KVM hands back: sregs, events, translations, exits."""

from __future__ import annotations

from dataclasses import dataclass, fields

from . import ioctls as K


@dataclass(frozen=True, slots=True)
class Segment:
    """struct kvm_segment: a segment register's hidden (cached descriptor) state."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 3
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0
    g: int = 0
    avl: int = 0
    unusable: int = 0

    def pack(self) -> bytes:
        return K.KVM_SEGMENT.pack(self.base, self.limit, self.selector, self.type, self.present,
                                  self.dpl, self.db, self.s, self.l, self.g, self.avl,
                                  self.unusable)

    @classmethod
    def unpack_from(cls, buf: bytes | bytearray, offset: int) -> Segment:
        return cls(*K.KVM_SEGMENT.unpack_from(buf, offset))


@dataclass(frozen=True, slots=True)
class DTable:
    """struct kvm_dtable: GDTR / IDTR."""

    base: int = 0
    limit: int = 0xFFFF


@dataclass(frozen=True, slots=True)
class Sregs:
    """struct kvm_sregs, field for field."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DTable
    idt: DTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def cpl(self) -> int:
        """What the CPU treats as CPL in long mode: SS.DPL (equal to CS.DPL outside transitions)."""
        return self.ss.dpl

    def pack(self) -> bytes:
        out = bytearray(K.KVM_SREGS_SIZE)
        for i, name in enumerate(K.SEGMENT_NAMES):
            seg: Segment = getattr(self, name)
            K.KVM_SEGMENT.pack_into(out, i * K.KVM_SEGMENT.size, *_segment_tuple(seg))
        K.KVM_DTABLE.pack_into(out, K.SREGS_GDT_OFFSET, self.gdt.base, self.gdt.limit)
        K.KVM_DTABLE.pack_into(out, K.SREGS_IDT_OFFSET, self.idt.base, self.idt.limit)
        K.SREGS_CONTROL.pack_into(out, K.SREGS_CONTROL_OFFSET, self.cr0, self.cr2, self.cr3,
                                  self.cr4, self.cr8, self.efer, self.apic_base,
                                  *self.interrupt_bitmap)
        return bytes(out)

    @classmethod
    def unpack(cls, buf: bytes | bytearray) -> Sregs:
        segs = {name: Segment.unpack_from(buf, i * K.KVM_SEGMENT.size)
                for i, name in enumerate(K.SEGMENT_NAMES)}
        gdt = DTable(*K.KVM_DTABLE.unpack_from(buf, K.SREGS_GDT_OFFSET))
        idt = DTable(*K.KVM_DTABLE.unpack_from(buf, K.SREGS_IDT_OFFSET))
        ctl = K.SREGS_CONTROL.unpack_from(buf, K.SREGS_CONTROL_OFFSET)
        return cls(**segs, gdt=gdt, idt=idt, cr0=ctl[0], cr2=ctl[1], cr3=ctl[2], cr4=ctl[3],
                   cr8=ctl[4], efer=ctl[5], apic_base=ctl[6], interrupt_bitmap=tuple(ctl[7:11]))


def _segment_tuple(seg: Segment) -> tuple[int, ...]:
    return tuple(getattr(seg, f.name) for f in fields(Segment))


SREGS_FIELDS: frozenset[str] = frozenset(f.name for f in fields(Sregs))
SEGMENT_FIELDS: frozenset[str] = frozenset(f.name for f in fields(Segment))


@dataclass(frozen=True, slots=True)
class VcpuEvents:
    """struct kvm_vcpu_events.  After a triple-fault shutdown kvm_pvm keeps the first exception
    here (observed, not an ABI promise); vector 0 cannot be told apart from "no exception"."""

    exception_injected: int
    exception_nr: int
    exception_has_error_code: int
    exception_pending: int
    exception_error_code: int
    interrupt_injected: int
    interrupt_nr: int
    interrupt_soft: int
    interrupt_shadow: int
    nmi_injected: int
    nmi_pending: int
    nmi_masked: int
    nmi_pad: int
    sipi_vector: int
    flags: int
    smi_smm: int
    smi_pending: int
    smi_inside_nmi: int
    smi_latched_init: int
    triple_fault_pending: int
    exception_has_payload: int
    exception_payload: int

    @classmethod
    def unpack(cls, buf: bytes | bytearray) -> VcpuEvents:
        return cls(*K.KVM_VCPU_EVENTS.unpack(buf))

    def pack(self) -> bytes:
        return K.KVM_VCPU_EVENTS.pack(*(getattr(self, f.name) for f in fields(self)))


@dataclass(frozen=True, slots=True)
class Translation:
    """KVM_TRANSLATE's answer.  On kvm_pvm ``writeable`` is always 1 and ``usermode`` 0, and the
    walk sets A bits in the guest tables."""

    linear_address: int
    physical_address: int
    valid: bool
    writeable: bool
    usermode: bool


@dataclass(frozen=True, slots=True)
class MmioAccess:
    """One KVM_EXIT_MMIO as the VMM saw it; for a read, ``data`` is what the VMM answered
    (None while the read is unanswered)."""

    phys_addr: int
    len: int
    data: bytes | None
    is_write: bool

    @property
    def direction(self) -> str:
        return "write" if self.is_write else "read"

    @property
    def value(self) -> int | None:
        return None if self.data is None else int.from_bytes(self.data, "little")


@dataclass(frozen=True, slots=True)
class VcpuExit:
    """What one KVM_RUN ended with.  Only the fields of the exit's kind are set."""

    reason: str
    code: int
    # mmio
    phys_addr: int | None = None
    len: int | None = None
    is_write: bool | None = None
    data: bytes | None = None
    # io (is_write is True for OUT; data is the bytes of an OUT; port/size/count for both)
    port: int | None = None
    size: int | None = None
    count: int | None = None
    # internal_error
    suberror: int | None = None
    suberror_name: str | None = None
    internal_data: tuple[int, ...] = ()
    insn_bytes: bytes | None = None
    # debug
    exception: int | None = None
    pc: int | None = None
    dr6: int | None = None
    dr7: int | None = None
    # fail_entry
    hardware_entry_failure_reason: int | None = None

    @property
    def value(self) -> int | None:
        """``data`` as a little-endian integer (the written value of an MMIO or OUT exit)."""
        return None if self.data is None else int.from_bytes(self.data, "little")

    def __str__(self) -> str:
        if self.reason == "mmio":
            rw = "write" if self.is_write else "read"
            val = f" {self.value:#x}" if self.is_write else ""
            return f"mmio {rw} {self.len}B @{self.phys_addr:#x}{val}"
        if self.reason == "io":
            rw = "out" if self.is_write else "in"
            return f"io {rw} {self.size}B x{self.count} port {self.port:#x}"
        if self.reason == "internal_error":
            insn = f" insn {self.insn_bytes.hex()}" if self.insn_bytes else ""
            return f"internal_error {self.suberror_name or self.suberror}{insn}"
        return self.reason
