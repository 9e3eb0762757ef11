"""ioctl numbers, capability numbers and struct layouts of the KVM userspace ABI (x86-64).

The numbers are written out as literals (not computed here) so that a test can recompute them from
the Linux ``_IOC`` formula and catch a typo in either place.  Each comment gives the direction, the
ioctl nr and the struct whose size is encoded in bits 16..29.
"""

from __future__ import annotations

from struct import Struct

KVM_API_VERSION = 12

# -- ioctls on /dev/kvm --------------------------------------------------------------------------
KVM_GET_API_VERSION = 0xAE00          # _IO   0x00
KVM_CREATE_VM = 0xAE01                # _IO   0x01, arg = machine type 0
KVM_GET_MSR_INDEX_LIST = 0xC004AE02   # _IOWR 0x02 struct kvm_msr_list (header u32 nmsrs)
KVM_CHECK_EXTENSION = 0xAE03          # _IO   0x03, also valid on a VM fd
KVM_GET_VCPU_MMAP_SIZE = 0xAE04       # _IO   0x04
KVM_GET_SUPPORTED_CPUID = 0xC008AE05  # _IOWR 0x05 struct kvm_cpuid2 (header)

# -- ioctls on a VM fd ---------------------------------------------------------------------------
KVM_CREATE_VCPU = 0xAE41              # _IO   0x41, arg = vcpu id
KVM_GET_DIRTY_LOG = 0x4010AE42        # _IOW  0x42 struct kvm_dirty_log
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # _IOW 0x46 struct kvm_userspace_memory_region
KVM_REGISTER_COALESCED_MMIO = 0x4010AE67    # _IOW 0x67 struct kvm_coalesced_mmio_zone
KVM_UNREGISTER_COALESCED_MMIO = 0x4010AE68  # _IOW 0x68 struct kvm_coalesced_mmio_zone
KVM_IOEVENTFD = 0x4040AE79            # _IOW  0x79 struct kvm_ioeventfd
KVM_ENABLE_CAP = 0x4068AEA3           # _IOW  0xa3 struct kvm_enable_cap (VM and vCPU fds)
KVM_GET_STATS_FD = 0xAECE             # _IO   0xce (VM and vCPU fds)

# -- ioctls on a vCPU fd -------------------------------------------------------------------------
KVM_RUN = 0xAE80                      # _IO   0x80
KVM_GET_REGS = 0x8090AE81             # _IOR  0x81 struct kvm_regs
KVM_SET_REGS = 0x4090AE82             # _IOW  0x82 struct kvm_regs
KVM_GET_SREGS = 0x8138AE83            # _IOR  0x83 struct kvm_sregs
KVM_SET_SREGS = 0x4138AE84            # _IOW  0x84 struct kvm_sregs
KVM_TRANSLATE = 0xC018AE85            # _IOWR 0x85 struct kvm_translation
KVM_GET_MSRS = 0xC008AE88             # _IOWR 0x88 struct kvm_msrs (header)
KVM_SET_MSRS = 0x4008AE89             # _IOW  0x89 struct kvm_msrs (header)
KVM_SET_CPUID2 = 0x4008AE90           # _IOW  0x90 struct kvm_cpuid2 (header)
KVM_SET_GUEST_DEBUG = 0x4048AE9B      # _IOW  0x9b struct kvm_guest_debug
KVM_GET_VCPU_EVENTS = 0x8040AE9F      # _IOR  0x9f struct kvm_vcpu_events
KVM_SET_VCPU_EVENTS = 0x4040AEA0      # _IOW  0xa0 struct kvm_vcpu_events

IOCTL_NAMES: dict[int, str] = {
    value: name for name, value in globals().items()
    if name.startswith("KVM_") and isinstance(value, int) and name != "KVM_API_VERSION"
}

# -- capabilities (KVM_CHECK_EXTENSION / KVM_ENABLE_CAP) -----------------------------------------
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_IOEVENTFD = 36
KVM_CAP_READONLY_MEM = 81
KVM_CAP_GUEST_DEBUG_HW_BPS = 119
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_EXCEPTION_PAYLOAD = 164
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_EXIT_ON_EMULATION_FAILURE = 204
KVM_CAP_X86_TRIPLE_FAULT_EVENT = 218

# -- memslot flags -------------------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# -- guest debug control -------------------------------------------------------------------------
KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2
KVM_GUESTDBG_USE_SW_BP = 0x10000
KVM_GUESTDBG_USE_HW_BP = 0x20000

# -- kvm_vcpu_events.flags -----------------------------------------------------------------------
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20

# -- exit reasons (kvm_run.exit_reason), named as KVM_EXIT_* without the prefix, lower case ------
EXIT_REASONS: dict[int, str] = {
    0: "unknown", 1: "exception", 2: "io", 3: "hypercall", 4: "debug", 5: "hlt", 6: "mmio",
    7: "irq_window_open", 8: "shutdown", 9: "fail_entry", 10: "intr", 11: "set_tpr",
    12: "tpr_access", 13: "s390_sieic", 14: "s390_reset", 15: "dcr", 16: "nmi",
    17: "internal_error", 18: "osi", 19: "papr_hcall", 20: "s390_ucontrol", 21: "watchdog",
    22: "s390_tsch", 23: "epr", 24: "system_event", 25: "s390_stsi", 26: "ioapic_eoi",
    27: "hyperv", 28: "arm_nisv", 29: "x86_rdmsr", 30: "x86_wrmsr", 31: "dirty_ring_full",
    32: "ap_reset_hold", 33: "x86_bus_lock", 34: "xen", 35: "riscv_sbi", 36: "riscv_csr",
    37: "notify", 38: "loongarch_iocsr", 39: "memory_fault",
}
KVM_EXIT_IO = 2
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17

INTERNAL_ERROR_SUBERRORS: dict[int, str] = {
    1: "emulation", 2: "simul_ex", 3: "delivery_ev", 4: "unexpected_exit_reason",
}
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# -- struct layouts (little endian, no implicit padding: every pad is spelled out) ---------------
REG_NAMES: tuple[str, ...] = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)
KVM_REGS = Struct("<18Q")
# kvm_segment: base, limit, selector, type, present, dpl, db, s, l, g, avl, unusable, padding
KVM_SEGMENT = Struct("<QIH9Bx")
# kvm_dtable: base, limit, padding[3]
KVM_DTABLE = Struct("<QH6x")
SEGMENT_NAMES: tuple[str, ...] = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
SREGS_GDT_OFFSET = 8 * KVM_SEGMENT.size            # 192
SREGS_IDT_OFFSET = SREGS_GDT_OFFSET + KVM_DTABLE.size  # 208
SREGS_CONTROL_OFFSET = SREGS_IDT_OFFSET + KVM_DTABLE.size  # 224
# cr0, cr2, cr3, cr4, cr8, efer, apic_base, interrupt_bitmap[4]
SREGS_CONTROL = Struct("<7Q4Q")
KVM_SREGS_SIZE = SREGS_CONTROL_OFFSET + SREGS_CONTROL.size  # 312

# kvm_userspace_memory_region: slot, flags, guest_phys_addr, memory_size, userspace_addr
KVM_USERSPACE_MEMORY_REGION = Struct("<IIQQQ")
# kvm_dirty_log: slot, padding, dirty_bitmap pointer
KVM_DIRTY_LOG = Struct("<IIQ")
# kvm_translation: linear_address, physical_address, valid, writeable, usermode, pad[5]
KVM_TRANSLATION = Struct("<QQBBB5x")
# kvm_guest_debug: control, pad, debugreg[8]
KVM_GUEST_DEBUG = Struct("<II8Q")
# kvm_enable_cap: cap, flags, args[4], pad[64]
KVM_ENABLE_CAP_STRUCT = Struct("<II4Q64x")
# kvm_vcpu_events: exception{injected,nr,has_error_code,pending,error_code}, interrupt{injected,nr,
# soft,shadow}, nmi{injected,pending,masked,pad}, sipi_vector, flags, smi{smm,pending,
# smm_inside_nmi,latched_init}, triple_fault.pending, reserved[26], exception_has_payload,
# exception_payload
KVM_VCPU_EVENTS = Struct("<4BI4B4BII4BB26xBQ")
# kvm_msrs header (nmsrs, pad) and kvm_msr_entry (index, reserved, data)
KVM_MSRS_HEADER = Struct("<II")
KVM_MSR_ENTRY = Struct("<IIQ")
# kvm_cpuid2 header (nent, padding) and kvm_cpuid_entry2
KVM_CPUID2_HEADER = Struct("<II")
KVM_CPUID_ENTRY2 = Struct("<IIIIIII3I")
# kvm_coalesced_mmio_zone: addr, size, pio (or pad)
KVM_COALESCED_MMIO_ZONE = Struct("<QII")
# kvm_ioeventfd: datamatch, addr, len, fd, flags, pad[36]
KVM_IOEVENTFD_STRUCT = Struct("<QQIiI36x")

# -- struct kvm_run (the vCPU mmap) --------------------------------------------------------------
RUN_IMMEDIATE_EXIT = 1            # u8
RUN_EXIT_REASON = 8               # u32
RUN_UNION = 32
RUN_EXIT_REASON_FMT = Struct("<I")
# mmio: phys_addr, data[8], len, is_write
RUN_MMIO = Struct("<Q8sIB")
RUN_MMIO_DATA = RUN_UNION + 8
# io: direction, size, port, count, data_offset (from the start of kvm_run)
RUN_IO = Struct("<BBHIQ")
# internal: suberror, ndata, data[16]
RUN_INTERNAL = Struct("<II16Q")
# debug.arch (x86): exception, pad, pc, dr6, dr7
RUN_DEBUG = Struct("<IIQQQ")
# fail_entry: hardware_entry_failure_reason, cpu
RUN_FAIL_ENTRY = Struct("<QI")
