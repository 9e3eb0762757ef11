"""The guest runtime: descriptor tables, page tables from a description, the handlers' contract."""

from __future__ import annotations

from struct import unpack_from

import pytest

from kvmmu.errors import InvalidArgument
from kvmmu.guest.runtime import (
    RT_FIXUP,
    RT_IDT,
    RT_LOG,
    RT_ULOG,
    Demand,
    Map,
    Program,
    build,
    expand_svc,
)


def qword(img, gpa: int) -> int:
    return unpack_from("<Q", img.memory.get(gpa & ~0xFFF, bytes(4096)), gpa & 0xFFF)[0]


def test_gdt_has_the_flat_long_mode_descriptors() -> None:
    """GDT: 64-bit code 0x00209A0000000000 (0x08), data 0x00CF92000000FFFF (0x10), DPL3 code
    0x0020FA0000000000 (0x23) and data 0x00CFF2000000FFFF (0x2b) — the notes' minimal setup."""
    img = build(Program("p", "hlt"))
    assert qword(img, img.gdt[0] + 0x08) == 0x00209A0000000000
    assert qword(img, img.gdt[0] + 0x10) == 0x00CF92000000FFFF
    assert qword(img, img.gdt[0] + 0x20) == 0x0020FA0000000000
    assert qword(img, img.gdt[0] + 0x28) == 0x00CFF2000000FFFF


def test_idt_gates_are_interrupt_gates_to_the_runtime_stubs() -> None:
    """Every vector 0-31 has a present 64-bit interrupt gate (type 0xE) with selector 0x08."""
    img = build(Program("p", "hlt"))
    for v in range(32):
        lo = qword(img, RT_IDT + 16 * v)
        target = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000)
        assert (lo >> 16) & 0xFFFF == 0x08 and (lo >> 40) & 0xFF == 0x8E
        assert target == img.handlers.labels[f"rt_vec{v}"]


def test_tss_rsp0_is_the_kernel_stack_top() -> None:
    """A CPL3 -> CPL0 exception switches to TSS.RSP0 (64-bit TSS: RSP0 at +4)."""
    img = build(Program("p", "hlt", cpl=3))
    assert qword(img, img.tss[0] + 4) == 0x8000


def test_maps_become_ptes_with_the_requested_flags() -> None:
    """rw/u/nx/a/d tokens are the PTE bits; nx also turns on EFER.NXE; 2m sets PS in the PDE."""
    img = build(Program("p", "hlt", maps=(Map(0x60_0000, 0x1000, 0x64_0000, "rw u nx a d"),
                                          Map(0xA0_0000, 0x20_0000, 0x20_0000, "u 2m"))))
    assert qword(img, img.pte(0x60_0000)) == 0x64_0000 | 0x67 | 1 << 63
    assert qword(img, img.pte(0xA0_0000, level=2)) == 0x20_0000 | 0x85
    assert img.efer & (1 << 11)


def test_np_builds_the_table_but_leaves_the_pte_not_present() -> None:
    img = build(Program("p", "hlt", maps=(Map(0x70_0000, 0x1000, flags="np"),)))
    assert qword(img, img.pte(0x70_0000)) == 0


def test_page_table_alias_maps_the_table_page() -> None:
    """gpa="pt:GVA" maps the level-1 table that holds GVA's PTE (to edit PTEs through it)."""
    img = build(Program("p", "hlt", maps=(Map(0x70_0000), Map(0x7F_0000, 0x1000, "pt:0x700000", "rw u"))))
    assert qword(img, img.pte(0x7F_0000)) & ~0xFFF == img.pte(0x70_0000) & ~0xFFF


def test_extra_address_spaces_get_their_own_root_and_symbols() -> None:
    """spaces: CR3_0, CR3_1 and pte_in(space, gva) are symbols the code can use."""
    img = build(Program("p", "mov rax, CR3_1\nmov rbx, pte_in(1, 0x700000)\nhlt",
                        maps=(Map(0x70_0000, 0x1000, 0x64_0000),), spaces=((Map(0x70_0000, 0x1000, 0x65_0000),),)))
    cr3_1 = img.symbols["CR3_1"]
    assert cr3_1 != img.cr3 and img.symbols["CR3_0"] == img.cr3
    pml4e = qword(img, cr3_1 + 8 * 0)
    assert pml4e & 1


def test_svc_is_ud2_at_cpl3_and_a_call_at_cpl0() -> None:
    assert expand_svc("  svc\nx: svc ; comment", 3) == "  ud2\nx: ud2"
    assert expand_svc("  svc", 0) == "  call rt_svc"


def test_control_block_symbols_follow_the_ring() -> None:
    """CPL0 code sees the control block at RT_LOG; CPL3 code through its user alias."""
    k = build(Program("p", "mov qword [RT_FIXUP], 1\nhlt"))
    u = build(Program("p", "mov qword [RT_FIXUP], 1\nhlt", cpl=3))
    assert k.symbols["RT_FIXUP"] == RT_FIXUP
    assert u.symbols["RT_FIXUP"] == RT_FIXUP - RT_LOG + RT_ULOG
    assert qword(u, u.pte(RT_ULOG)) & ~0xFFF == RT_LOG


def test_fixup_label_is_written_into_the_control_block() -> None:
    img = build(Program("p", "nop\nback: hlt", fixup="back"))
    assert qword(img, RT_FIXUP) == img.symbols["back"]


def test_cpl3_programs_start_in_user_mode_with_if_set() -> None:
    """CPL3 starts at the user text with RSP at the user stack and IF=1 (kvm_pvm reads IF=1 at CPL3
    anyway, notes §6)."""
    img = build(Program("p", "hlt", cpl=3))
    assert (img.rip, img.rsp, img.rflags, img.cpl) == (0x40_0000, 0x60_0000, 0x202, 3)


def test_demand_action_needs_a_window() -> None:
    with pytest.raises(InvalidArgument, match="Program.demand"):
        build(Program("p", "hlt", faults={"pf": "demand"}))
    build(Program("p", "hlt", faults={"pf": "demand"}, demand=Demand(0x70_0000, 0x1000, 0x68_0000)))


@pytest.mark.parametrize(("kwargs", "what"), [
    ({"maps": (Map(0x60_0000, 0x1000, flags="rw bogus"),)}, "Map.flags"),
    ({"maps": (Map(0x60_0800, 0x1000),)}, "Map"),
    ({"faults": {"nope": "stop"}}, "faults"),
    ({"cpl": 1}, "cpl"),
])
def test_bad_descriptions_raise_invalid_argument(kwargs: dict, what: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        build(Program("p", "hlt", **kwargs))
    assert e.value.what == what
