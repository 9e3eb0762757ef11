"""The guest runtime: a small 64-bit "kernel" laid out in guest memory around a test program.

A `Program` says what to run (assembly for CPL0 or CPL3), which pages to map (`Map`), which
memslots exist, what the fault handlers do, and what the host does between runs.  `build(program)`
turns it into a `GuestImage`: bytes per guest-physical address, the control registers and the
entry registers — the same for the model and for the real /dev/kvm.

Guest-physical (and, identity-mapped, guest-virtual) layout of the runtime:

    0x1000 GDT   0x2000 IDT (32 gates)   0x3000 TSS (RSP0 = 0x8000)
    0x4000 control block + fault log (supervisor; CPL3 code sees it at 0xB000, and the symbols
           RT_LOG, RT_FIXUP... of a CPL3 program point there)
    0x5000-0x8000 kernel stack (CPL0 programs and every handler)
    0x8000 handlers and the service routine   0x10000-0x40000 page-table pool
    0x40000 CPL0 program text   0x400000 CPL3 program text   0x5fe000-0x600000 CPL3 stack

Control block (RT_LOG): +0 number of faults recorded, +8 fixup RIP for the "resume" action,
+0x40 fault records of 32 bytes: vector, error code, CR2, RIP (at most 126 are kept).

Handlers (IDT vectors 0-31): every exception is recorded, then handled by its action: ``"stop"``
(hlt for good), ``"resume"`` (continue at the fixup RIP), ``"demand"`` (map the faulting page of the
`Program.demand` window and retry), or assembly text of the program's own (saved rax, rbx, rcx,
rdx; frame at [rsp+32]: vector, error, rip, cs, rflags, rsp, ss; end with ``jmp rt_iret`` or
``jmp rt_stop``).  Two events are not faults and are not recorded: a CPL3 ``hlt`` (#GP at an F4
byte) is the program's "halt": the kernel halts for it and resumes it after the hlt; ``ud2`` is the
service call ``svc`` (rax = 1: invlpg [rdi], 2: mov cr3, rdi, 3: mov qword [rdi], rsi).  The
pseudo-instruction ``svc`` assembles to ``ud2`` at CPL3 and ``call rt_svc`` at CPL0, so one text
serves both rings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from struct import pack

from ..arch import bits
from ..arch.descriptors import (
    GDT_LIMIT,
    KERNEL_DS,
    TSS_SEL,
    TSS_SIZE,
    USER_CS,
    USER_DS,
    gdt_image,
    idt_gate,
    tss_image,
)
from ..errors import InvalidArgument
from ..tools.asm import Assembled, assemble
from .pagetables import GuestPageTables
from .runtime_program import Action, Demand, Map, Program, Slot, WritePhys, both_rings, default_mmio_read

Symbol = int | Callable[..., int]     # an assembler symbol: a constant, or a function the code calls: pte(gva)

# -- layout -------------------------------------------------------------------------------------
RT_GDT = 0x1000
RT_IDT = 0x2000
RT_TSS = 0x3000
RT_LOG = 0x4000
RT_FIXUP = RT_LOG + 8
RT_SCRATCH = RT_LOG + 0x10
RT_LOG_ENTRIES = RT_LOG + 0x40
RT_LOG_ENTRY_SIZE = 32
RT_LOG_MAX = (0x1000 - 0x40) // RT_LOG_ENTRY_SIZE
RT_ULOG = 0xB000                  # a user-accessible alias of the control block (for CPL3 code)
RT_KSTACK_BOTTOM = 0x5000
RT_KSTACK_TOP = 0x8000
RT_HANDLERS = 0x8000
RT_HANDLERS_END = 0xA000
RT_PT_POOL = 0x10000
RT_PT_POOL_END = 0x40000
KTEXT = 0x40000
UTEXT = 0x400000
USTACK_BOTTOM = 0x5FE000
USTACK_TOP = 0x600000
IDT_VECTORS = 32

CR0_PE, CR0_ET, CR0_NE = bits.X86_CR0_PE, bits.X86_CR0_ET, bits.X86_CR0_NE
CR0_WP, CR0_PG = bits.X86_CR0_WP, bits.X86_CR0_PG
CR4_PAE = bits.X86_CR4_PAE
CR4_OSFXSR = bits.X86_CR4_OSFXSR
CR4_SMAP = bits.X86_CR4_SMAP
EFER_LME, EFER_LMA, EFER_NXE = bits.EFER_LME, bits.EFER_LMA, bits.EFER_NX
RFLAGS_FIXED, RFLAGS_IF = bits.X86_EFLAGS_FIXED, bits.X86_EFLAGS_IF

# Exceptions that push an error code.
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
VECTOR_NAMES = {"de": 0, "db": 1, "bp": 3, "ud": 6, "df": 8, "np": 11, "ss": 12, "gp": 13, "pf": 14}


# -- the result of the layout ---------------------------------------------------------------------
@dataclass
class GuestImage:
    """What both backends load: memory, control registers, entry registers, and symbols."""

    program: Program
    memory: dict[int, bytearray]                 # gpa of a 4 KiB page -> its bytes
    cr0: int
    cr3: int
    cr4: int
    efer: int
    rip: int
    rsp: int
    rflags: int
    cpl: int
    gdt: tuple[int, int]
    idt: tuple[int, int]
    tss: tuple[int, int]
    symbols: dict[str, int]
    pagetables: GuestPageTables
    code: Assembled
    handlers: Assembled

    def writes(self) -> list[tuple[int, bytes]]:
        """(gpa, page bytes) in address order, only for pages that are not all zero."""
        return [(gpa, bytes(buf)) for gpa, buf in sorted(self.memory.items()) if any(buf)]

    def pte(self, gva: int, level: int = 1) -> int:
        return self.pagetables.entry_addr(gva, level, create=False)


class _Image:
    """Sparse guest-physical memory being laid out (4 KiB pages)."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}

    def write(self, gpa: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            page = (gpa + pos) & ~0xFFF
            off = (gpa + pos) & 0xFFF
            n = min(len(data) - pos, 0x1000 - off)
            buf = self.pages.setdefault(page, bytearray(0x1000))
            buf[off:off + n] = data[pos:pos + n]
            pos += n

    def read(self, gpa: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            a = gpa + len(out)
            page = self.pages.get(a & ~0xFFF)
            n = min(size - len(out), 0x1000 - (a & 0xFFF))
            out += page[a & 0xFFF:(a & 0xFFF) + n] if page is not None else bytes(n)
        return bytes(out)


# -- handlers -------------------------------------------------------------------------------------
def _vector(key: int | str) -> int:
    if isinstance(key, str):
        if key.lower() not in VECTOR_NAMES:
            raise InvalidArgument("faults", key, f"vector names are {sorted(VECTOR_NAMES)}")
        return VECTOR_NAMES[key.lower()]
    if not 0 <= key < IDT_VECTORS:
        raise InvalidArgument("faults", key, f"vectors are 0..{IDT_VECTORS - 1}")
    return key


def handler_source(program: Program) -> str:
    """The runtime's handler code for ``program`` (assembled at RT_HANDLERS)."""
    actions = {_vector(k): v for k, v in program.faults.items()}
    lines = []
    for v in range(IDT_VECTORS):
        lines.append(f"rt_vec{v}:")
        if v not in ERROR_CODE_VECTORS:
            lines.append("    push 0")
        lines.append(f"    push {v}")
        lines.append("    jmp rt_common")
    smap = program.cr4 & CR4_SMAP
    # With SMAP the handler may read the user instruction bytes only with EFLAGS.AC set (STAC is an
    # emulation failure on kvm_pvm, so through POPFQ); the flags are restored right after.
    stac = "pushfq\n    or dword [rsp], 0x40000\n    popfq\n    " if smap else ""
    clac = "pushfq\n    and dword [rsp], -0x40001\n    popfq\n    " if smap else ""
    lines.append("""
rt_common:
    push rax
    push rbx
    push rcx
    push rdx
    cmp qword [rsp+32], 6
    jne rt_not_ud
    mov rax, [rsp+48]
    {stac}cmp word [rax], 0x0b0f
    {clac}jne rt_record
    mov rax, [rsp+24]
    call rt_svc
    add qword [rsp+48], 2
    jmp rt_iret
rt_not_ud:
    cmp qword [rsp+32], 13
    jne rt_record
    test byte [rsp+56], 3
    jz rt_record
    mov rax, [rsp+48]
    {stac}cmp byte [rax], 0xf4
    {clac}jne rt_record
    hlt
    add qword [rsp+48], 1
    jmp rt_iret
rt_record:
    mov rax, [RT_LOG]
    cmp rax, RT_LOG_MAX
    jae rt_counted
    shl rax, 5
    add rax, RT_LOG_ENTRIES
    mov rbx, [rsp+32]
    mov [rax], rbx
    mov rbx, [rsp+40]
    mov [rax+8], rbx
    mov rbx, cr2
    mov [rax+16], rbx
    mov rbx, [rsp+48]
    mov [rax+24], rbx
rt_counted:
    add qword [RT_LOG], 1
    mov rax, [rsp+32]""".replace("{stac}", stac).replace("{clac}", clac))
    for v in sorted(actions):
        lines.append(f"    cmp rax, {v}")
        lines.append(f"    je rt_act{v}")
    lines.append("    jmp rt_stop")
    for v, action in sorted(actions.items()):
        lines.append(f"rt_act{v}:")
        if action == "stop":
            lines.append("    jmp rt_stop")
        elif action == "resume":
            lines.append("    jmp rt_resume")
        elif action == "demand":
            if program.demand is None:
                raise InvalidArgument("faults", action, "the demand action needs Program.demand")
            lines.append("    jmp rt_demand")
        else:
            lines.append(action)
            lines.append("    jmp rt_stop")
    lines.append("""
rt_stop:
    hlt
    jmp rt_stop
rt_resume:
    mov rax, [RT_FIXUP]
    test rax, rax
    jz rt_stop
    mov [rsp+48], rax
rt_iret:
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq
rt_svc:
    cmp rax, 1
    jne rt_svc2
    invlpg [rdi]
    ret
rt_svc2:
    cmp rax, 2
    jne rt_svc3
    mov cr3, rdi
    ret
rt_svc3:
    cmp rax, 3
    jne rt_svc_bad
    mov [rdi], rsi
    ret
rt_svc_bad:
    ret""")
    if program.demand is not None:
        d = program.demand
        flags = Map(d.gva, d.size, d.gpa, d.flags).pte_flags()
        # Down the tables from CR3 to the PTE's address (rbx): one index per level, the PML4 first;
        # above the PTE, the entry is loaded and masked to the next table's address.
        down = "mov rbx, [rbx+rcx*8]\n    and rbx, rdx"
        walk = "".join(f"\n    mov rcx, rax\n    shr rcx, {shift}\n    and ecx, 511\n    {step}"
                       for shift, step in ((39, down), (30, down), (21, down), (12, "lea rbx, [rbx+rcx*8]")))
        lines.append(f"""
rt_demand:
    mov rax, cr2
    mov rbx, {d.gva:#x}
    cmp rax, rbx
    jb rt_stop
    mov rbx, {d.gva + d.size:#x}
    cmp rax, rbx
    jae rt_stop
    mov rdx, 0x000ffffffffff000
    mov rbx, cr3
    and rbx, rdx{walk}
    mov rcx, {d.gva:#x}
    sub rax, rcx
    and rax, -4096
    mov rcx, {d.gpa | flags:#x}
    add rax, rcx
    mov [rbx], rax
    jmp rt_iret""")
    return "\n".join(lines)


_SVC_RE = re.compile(r"^(\s*(?:[A-Za-z_.$][\w.$]*\s*:\s*)*)svc\s*(?:[;#].*)?$", re.I | re.M)


def expand_svc(code: str, cpl: int) -> str:
    """``svc`` -> ``ud2`` (CPL3: the #UD handler runs the service) or ``call rt_svc`` (CPL0)."""
    return _SVC_RE.sub(lambda m: m.group(1) + ("ud2" if cpl == 3 else "call rt_svc"), code)


# -- build ----------------------------------------------------------------------------------------
def build(program: Program) -> GuestImage:
    """Lay the runtime and the program out in guest memory (deterministic: same input, same bytes)."""
    if program.cpl not in (0, 3):
        raise InvalidArgument("cpl", program.cpl, "programs run at CPL0 or CPL3")
    img = _Image()
    base_symbols = {
        "RT_LOG": RT_LOG, "RT_FIXUP": RT_FIXUP, "RT_SCRATCH": RT_SCRATCH, "RT_LOG_ENTRIES": RT_LOG_ENTRIES,
        "RT_LOG_MAX": RT_LOG_MAX, "KTEXT": KTEXT, "UTEXT": UTEXT, "USTACK_TOP": USTACK_TOP,
        "RT_KSTACK_TOP": RT_KSTACK_TOP,
    }
    pt = GuestPageTables("4level", lambda gpa, size, value: img.write(gpa, value.to_bytes(size, "little")),
                         lambda gpa, size: int.from_bytes(img.read(gpa, size), "little"),
                         pool=RT_PT_POOL, pool_end=RT_PT_POOL_END)

    def pte(gva: int) -> int:
        return pt.entry_addr(gva, 1, create=False)

    def pde(gva: int) -> int:
        return pt.entry_addr(gva, 2, create=False)

    handlers = assemble(handler_source(program), RT_HANDLERS, {**base_symbols, **program.symbols})
    if handlers.end() > RT_HANDLERS_END:
        raise InvalidArgument("handlers", handlers.end(), "the handler code outgrew its two pages")
    text_base = KTEXT if program.cpl == 0 else UTEXT
    # The handlers use the supervisor mapping of the control block (SMAP-safe); CPL3 code sees it
    # through the user alias.
    view = 0 if program.cpl == 0 else RT_ULOG - RT_LOG
    ring_symbols = {"RT_LOG": RT_LOG + view, "RT_FIXUP": RT_FIXUP + view, "RT_SCRATCH": RT_SCRATCH + view,
                    "RT_LOG_ENTRIES": RT_LOG_ENTRIES + view}
    symbols: dict[str, Symbol] = {**base_symbols, **ring_symbols,
                                  **{k: v for k, v in handlers.labels.items() if k.startswith("rt_")},
                                  **program.symbols}
    # Page tables first (program maps in order, then the runtime's), so pte() works in the code.
    runtime_maps = [
        Map(RT_GDT, 0x3000, flags="rw"), Map(RT_LOG, 0x1000, flags="rw"), Map(RT_ULOG, 0x1000, RT_LOG, "rw u"),
        Map(RT_KSTACK_BOTTOM, RT_KSTACK_TOP - RT_KSTACK_BOTTOM, flags="rw"),
        Map(RT_HANDLERS, RT_HANDLERS_END - RT_HANDLERS, flags="rw"),
        Map(RT_PT_POOL, RT_PT_POOL_END - RT_PT_POOL, flags="rw"),
    ]
    if program.cpl == 3:
        runtime_maps.append(Map(USTACK_BOTTOM, USTACK_TOP - USTACK_BOTTOM, flags="rw u"))
    # The code size is needed to map the text: assemble once with a provisional symbol table.
    code_text = expand_svc(program.code, program.cpl)
    cr3_syms = {f"CR3_{i}": 0 for i in range(1 + len(program.spaces))}
    probe_syms = {**symbols, **cr3_syms, "pte": _probe_fn, "pde": _probe_fn, "pte_in": _probe_fn}
    probe = _assemble(code_text, text_base, probe_syms)
    text_size = max((max(a + len(b) for a, b in probe.segments) - text_base + 0xFFF) & ~0xFFF, 0x1000)
    text_map = Map(text_base, text_size, flags="rw" if program.cpl == 0 else "rw u")
    reserved = [(m.gva, m.gva + m.size) for m in (text_map, *runtime_maps)]
    for maps in (program.maps, *program.spaces):
        for m in maps:
            for lo, hi in reserved:
                if m.gva < hi and lo < m.gva + m.size:
                    raise InvalidArgument("Map", m, f"overlaps the runtime's [{lo:#x}, {hi:#x}) (its tables, "
                                          "stacks, handlers or the program text)")
    tables = [pt]
    spaces = (program.maps, *program.spaces)
    for i, maps in enumerate(spaces):
        if i:
            tables.append(GuestPageTables("4level", pt.write, pt.read, pool=tables[-1].next,
                                          pool_end=RT_PT_POOL_END))
        space = tables[i]
        for m in (*[m for m in maps if m.alias is None], text_map, *runtime_maps):
            _apply_map(space, m)
        if program.demand is not None:
            d = program.demand
            for off in range(0, d.size, 0x1000):
                space.entry_addr(d.gva + off, 1)
        for m in maps:
            if m.alias is not None:       # its own tables now; the PTE once the target space exists
                space.entry_addr(m.gva, 1)
    for i, maps in enumerate(spaces):
        for m in maps:
            if m.alias is not None:
                _apply_map(tables[i], m, tables)

    def pte_in(space: int, gva: int) -> int:
        if not 0 <= space < len(tables):
            raise InvalidArgument("pte_in", space, f"address spaces are 0..{len(tables) - 1}")
        return tables[space].entry_addr(gva, 1, create=False)

    symbols.update({f"CR3_{i}": t.cr3 for i, t in enumerate(tables)})
    symbols["pte_in"] = pte_in
    code = _assemble(code_text, text_base, {**symbols, "pte": pte, "pde": pde})
    if max(a + len(b) for a, b in code.segments) > text_base + text_size:
        raise InvalidArgument("code", program.name, "the code grew between layout passes (an expression "
                              "that changes instruction sizes); use constants of a fixed size")
    for addr, data in code.segments:
        img.write(addr, data)
    for addr, data in handlers.segments:
        img.write(addr, data)
    # descriptor tables
    img.write(RT_GDT, gdt_image(RT_TSS))
    img.write(RT_TSS, tss_image(RT_KSTACK_TOP))
    img.write(RT_IDT, b"".join(idt_gate(handlers.labels[f"rt_vec{v}"]) for v in range(IDT_VECTORS)))
    if program.fixup is not None:
        target = code.labels[program.fixup] if isinstance(program.fixup, str) else program.fixup
        img.write(RT_FIXUP, pack("<Q", target))
    for gpa, data in program.data.items():
        img.write(gpa, bytes(data))
    _check_backed(program, img)
    entry = code.labels.get("start", text_base)
    efer = EFER_LME | EFER_LMA | (EFER_NXE if program.nx or _uses_nx(program) else 0)
    return GuestImage(
        program=program, memory=img.pages,
        cr0=CR0_PG | (CR0_WP if program.cr0_wp else 0) | CR0_NE | CR0_ET | CR0_PE, cr3=pt.cr3,
        cr4=CR4_PAE | CR4_OSFXSR | program.cr4, efer=efer,
        rip=entry, rsp=RT_KSTACK_TOP if program.cpl == 0 else USTACK_TOP,
        rflags=RFLAGS_FIXED | (RFLAGS_IF if program.cpl == 3 else 0), cpl=program.cpl,
        gdt=(RT_GDT, GDT_LIMIT), idt=(RT_IDT, 16 * IDT_VECTORS - 1), tss=(RT_TSS, TSS_SIZE - 1),
        symbols={**{k: v for k, v in symbols.items() if isinstance(v, int)}, **code.labels},
        pagetables=pt, code=code, handlers=handlers)


def _assemble(source: str, base: int, symbols: Mapping[str, Symbol]) -> Assembled:
    """tools.asm.assemble, given function symbols too (its `evaluate` calls them)."""
    return assemble(source, base, symbols)  # type: ignore[arg-type]  # its annotation names int symbols only


def _probe_fn(*args: int) -> int:
    return 0


def _uses_nx(program: Program) -> bool:
    return any("nx" in m.tokens for m in program.maps)


def _apply_map(pt: GuestPageTables, m: Map, tables: list[GuestPageTables] | None = None) -> None:
    size = m.page_size
    if m.alias is not None:
        space, target = m.alias
        if tables is None or space >= len(tables):
            raise InvalidArgument("Map.gpa", m.gpa, "no such address space")
        gpa = tables[space].entry_addr(target, 1, create=False) & ~0xFFF
        if m.size != 0x1000 or size != 0x1000:
            raise InvalidArgument("Map", m, "a page-table alias maps exactly one 4 KiB page")
    elif isinstance(m.gpa, int):
        gpa = m.gpa
    else:
        gpa = m.gva                   # identity (a str gpa is the alias above)
    if m.gva % size or m.size % size or gpa % size:
        raise InvalidArgument("Map", m, f"gva, gpa and size must be multiples of the page size {size:#x}")
    flags = m.pte_flags()
    for off in range(0, m.size, size):
        if not m.present:
            pt.entry_addr(m.gva + off, 1 if size == 4096 else 2)
            continue
        pt.map(m.gva + off, gpa + off, size, flags)


def _check_backed(program: Program, img: _Image) -> None:
    slots = program.slots
    for page in img.pages:
        if not any(s.gpa <= page < s.gpa + s.size for s in slots):
            raise InvalidArgument("gpa", page, "the runtime or the program put bytes where no initial memslot is")


__all__ = [
    "CR0_PG", "KTEXT", "RT_FIXUP", "RT_HANDLERS", "RT_IDT", "RT_KSTACK_TOP", "RT_LOG", "RT_LOG_ENTRIES",
    "RT_LOG_MAX", "RT_PT_POOL", "RT_SCRATCH", "RT_TSS", "USER_CS", "USER_DS", "USTACK_TOP", "UTEXT", "Action",
    "Demand", "GuestImage", "Map", "Program", "Slot", "TSS_SEL", "WritePhys", "both_rings", "build",
    "default_mmio_read", "expand_svc", "handler_source", "KERNEL_DS",
]
