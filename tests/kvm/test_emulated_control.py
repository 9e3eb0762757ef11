"""Guest control-register writes and INVLPG made by an instruction KVM is already emulating
(`exit=False`, as the host profiles' emulator makes them): the same effect, no exit of their own."""

from __future__ import annotations

import pytest

from tests.fuzz.test_found_bugs import LONG_MODE, Guest


@pytest.mark.parametrize("op", ["cr0", "cr3", "cr4", "invlpg"])
def test_an_emulated_control_instruction_counts_no_exit_of_its_own(op: str) -> None:
    """A MOV CR / INVLPG that KVM's emulator executes (exit=False) does what the intercepted one does
    but does not count in `exits`: the exit was the one that brought KVM into the emulator."""
    from kvmmu.arch.bits import X86_CR0_WP, X86_CR4_SMEP
    results = []
    for exit_ in (True, False):
        g = Guest("shadow")
        v = g.vcpu
        v.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
        assert v.access(0x10_0000, 8, "read").fault is None
        before, invlpg_before = v.stats["exits"], v.stats["invlpg"]
        if op == "cr0":
            v.write_cr0(v.cr0 & ~X86_CR0_WP, exit=exit_)
        elif op == "cr4":
            v.write_cr4(v.cr4 | X86_CR4_SMEP, exit=exit_)
        elif op == "cr3":
            v.write_cr3(g.pt.cr3, exit=exit_)
        else:
            v.invlpg(0x10_0000, exit=exit_)
        results.append((v.stats["exits"] - before, v.stats["invlpg"] - invlpg_before, v.cr0, v.cr4))
    assert results[0][0] == 1 and results[1][0] == 0
    assert results[0][1:] == results[1][1:]
