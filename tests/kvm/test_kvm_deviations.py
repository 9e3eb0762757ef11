"""VM(kvm_deviations=True): the places where KVM's behaviour departs from the SDM in a way the
guest can see, reproduced as KVM does them.  The default (False) follows the SDM; those cases are
the fuzzer's reproducers in tests/fuzz/test_found_bugs.py.  Expected values come from KVM's source:

- arch/x86/kvm/x86.c, kvm_inject_emulated_page_fault: the faulting address is invalidated only when
  the error code has P=1 and RSVD=0;
- arch/x86/kvm/x86.c, emulator_read_write: a page-crossing access is translated and performed one
  page at a time (emulator_read_write_onepage), returning at the first fault;
- arch/x86/kvm/mmu/mmu.c, kvm_init_shadow_mmu: root_role.efer_nx is set for every shadow MMU;
- arch/x86/kvm/x86.c, vcpu_mmio_gva_to_gpa: the MMIO gva cache answers any access its cached rights
  allow, and a read caches the rights of a clean PTE without W (protect_clean_gpte), so a CR0.WP=0
  supervisor write through it never walks and never sets D;
- arch/x86/kvm/x86.c, x86_emulate_instruction: with a direct MMU the fault address is always taken
  as the data's gpa (ctxt->gpa_available), even when the fault was on a guest page-table access;
- arch/x86/kvm/mmu/mmu.c, kvm_mmu_track_write: mmu_pte_write_fetch_gpte turns a 4-byte write by a
  vCPU with CR4.PAE into the aligned 8-byte gpte around it before detect_write_misaligned and
  get_written_sptes look at it, so a dword over two gptes zaps only the first one's spte.
- arch/x86/kvm/emulate.c, __linearize: a 64-bit access is checked for canonicality at its first byte
  only.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.arch.bits import EFER_LME
from kvmmu.guest.pagetables import NX, RW, A, D, P
from tests.fuzz.test_found_bugs import DATA, LONG_MODE, MMIO, Guest, pf


@pytest.mark.parametrize("deviations", [False, True])
def test_not_present_pf_from_the_emulator_keeps_an_unsync_spte_only_with_kvm_deviations(deviations: bool) -> None:
    g = Guest("shadow", kvm_deviations=deviations)
    pte = g.pt.map(0x40_0000, 0x50_0000, flags=P | RW | A | D)
    g.pt.map(0x40_1000, MMIO, flags=P | RW | A | D)
    g.vm.write_phys(0x50_0FF8, DATA.to_bytes(8, "little"))
    g.vcpu.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    assert g.vcpu.access(0x40_0FF8, 8, "read").value == DATA
    g.store(pte, 0x50_0000 | RW | A | D)             # P=0 without INVLPG: the page table goes unsync
    g.store(pte, 0x50_0000 | RW | A | D)
    r = g.vcpu.access(0x40_0FFC, 8, "read")          # emulated (MMIO second page): #PF(P=0) on page 1
    assert pf(r) == 0x0 and r.fault.cr2 == 0x40_0FFC
    r = g.vcpu.access(0x40_0FF8, 8, "read")
    if deviations:
        assert r.fault is None and r.value == DATA, "KVM does not invalidate for a P=0 #PF: the spte survives"
    else:
        assert pf(r) == 0x0, "the #PF invalidated its page (SDM 4.10.4.1)"


@pytest.mark.parametrize("deviations", [False, True])
def test_page_crossing_emulated_store_writes_its_first_page_only_with_kvm_deviations(deviations: bool) -> None:
    g = Guest("shadow", kvm_deviations=deviations)
    g.pt.map(0x40_0000, 0x50_0000, flags=P | RW | A | D)
    g.pt.map(0x40_1000, MMIO, flags=P | A | D)                          # read-only MMIO page
    g.vm.write_phys(0x50_0FFC, b"\x01\x02\x03\x04")
    v = g.vcpu
    v.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    assert v.access(0x40_1000, 4, "read").exits
    r = v.access(0x40_0FFC, 8, "write", 0xAAAAAAAA_BBBBBBBB)
    assert pf(r) == 0x3 and r.fault.cr2 == 0x40_1000 and not r.exits
    first = g.vm.read_phys(0x50_0FFC, 4)
    assert first == (b"\xbb\xbb\xbb\xbb" if deviations else b"\x01\x02\x03\x04")


@pytest.mark.parametrize("deviations", [False, True])
def test_vcpus_with_different_nxe_share_shadow_pages_only_with_kvm_deviations(deviations: bool) -> None:
    g = Guest("shadow", kvm_deviations=deviations)
    g.pt.map(0x40_0000, 0x50_0000, flags=P | RW | A | D | NX)
    g.vm.write_phys(0x50_0000, DATA.to_bytes(8, "little"))
    a, b = g.vcpu, g.vm.create_vcpu()
    a.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    b.set_sregs(cr3=g.pt.cr3, **{**LONG_MODE, "efer": EFER_LME})
    assert a.access(0x40_0000, 8, "read").value == DATA
    r = b.access(0x40_0000, 8, "read")
    if deviations:
        assert r.fault is None and r.value == DATA, "the NXE=0 vCPU runs on the spte the NXE=1 vCPU built"
    else:
        assert pf(r) == 0x9, "XD is reserved with EFER.NXE=0: #PF(P|RSVD)"


def test_kvm_deviations_must_be_a_bool() -> None:
    with pytest.raises(kvmmu.InvalidArgument, match="kvm_deviations"):
        kvmmu.VM(kvm_deviations="yes")  # type: ignore[arg-type]


def test_host_profiles_keep_kvm_deviations() -> None:
    from kvmmu.kvm.profiles import PROFILES
    for p in PROFILES.values():
        assert p.make_vm().kvm_deviations, p.name


@pytest.mark.parametrize("deviations", [False, True])
def test_page_table_gpa_becomes_the_data_gpa_only_with_kvm_deviations(deviations: bool) -> None:
    g = Guest("ept", kvm_deviations=deviations)
    g.pt.map(0x0, 0x50_0000, flags=P | RW | A | D)
    v = g.vcpu
    v.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    g.vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=0)   # the tables are gone
    r = v.access(0x0, 1, "read")              # the PML4 read exits; its gpa's offset is 0, like the gva's
    if deviations:
        assert r.fault is None and [e.phys_addr for e in r.exits] == [g.pt.cr3], "an MMIO read of the PML4"
    else:
        assert pf(r) == 0x0 and not r.exits


@pytest.mark.parametrize("mmu", ["shadow", "ept"])
@pytest.mark.parametrize("cpl", [0, 3])
@pytest.mark.parametrize("deviations", [False, True])
def test_instruction_fetch_from_mmio_fails_emulation_only_with_kvm_deviations(mmu: str, cpl: int,
                                                                            deviations: bool) -> None:
    """x86.c: kvm_fetch_guest_virt reads guest RAM only, so emulating a fetch from MMIO fails;
    handle_emulation_failure counts insn_emulation_fail, queues #UD and, at CPL0 outside guest mode,
    exits to userspace with KVM_INTERNAL_ERROR_EMULATION.  The SDM has the CPU read the device."""
    from kvmmu.guest.pagetables import US
    g = Guest(mmu, kvm_deviations=deviations)
    g.pt.map(0x40_0000, MMIO, flags=P | RW | US | A | D)
    v = g.vcpu
    v.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    r = v.access(0x40_0000, 4, "fetch", cpl=cpl)
    if deviations:
        assert r.fault is not None and r.fault.vector == 6 and not r.exits
        assert r.internal_error == ("KVM_INTERNAL_ERROR_EMULATION" if cpl == 0 else None)
        assert v.stats["insn_emulation_fail"] == 1
    else:
        assert r.fault is None and [e.phys_addr for e in r.exits] == [MMIO] and r.value == 0x77
        assert v.stats["insn_emulation_fail"] == 0



@pytest.mark.parametrize("deviations", [False, True])
def test_mmio_write_after_a_read_sets_d_only_without_kvm_deviations(deviations: bool) -> None:
    from kvmmu.arch.bits import X86_CR0_WP
    g = Guest("shadow", kvm_deviations=deviations)
    pte = g.pt.map(0x40_0000, MMIO, flags=P | RW | A)
    v = g.vcpu
    v.set_sregs(cr3=g.pt.cr3, **{**LONG_MODE, "cr0": LONG_MODE["cr0"] & ~X86_CR0_WP})
    assert v.access(0x40_0000, 4, "read").exits
    walks = v.counters["guest_walks"]
    assert v.access(0x40_0008, 4, "write", 5).exits
    dirty = bool(int.from_bytes(g.vm.read_phys(pte, 8), "little") & D)
    assert dirty is not deviations
    assert (v.counters["guest_walks"] == walks) is deviations, "KVM answers from the MMIO cache, no walk"


@pytest.mark.parametrize("deviations", [False, True])
def test_dword_store_over_two_ptes_keeps_the_second_stale_only_with_kvm_deviations(deviations: bool) -> None:
    """An emulated dword store over bytes 6..9 of a PTE rewrites the next PTE's low 16 bits (its frame
    bits 15:12).  SDM 4.10.4.1: after INVLPG of that page, and after a MOV CR3, the new PTE is used.
    KVM (kvm_mmu_track_write, see the module docstring) zaps only the first PTE's spte and leaves the
    shadow page synced, so neither INVLPG nor the CR3 reload resyncs the second (mmu_flooded stays 0);
    measured on the real KVM at CPL3: corpus program pte_straddle_dword_cpl3 (docs/real-kvm.md)."""
    from kvmmu.kvm.profiles import Emulator
    g = Guest("shadow", kvm_deviations=deviations)
    old, new = 0x50_1000, 0x50_2000
    pte0 = g.pt.map(0x40_0000, 0x50_0000, flags=P | RW | A | D)
    g.pt.map(0x40_1000, old, flags=P | RW | A | D)
    g.vm.write_phys(old, (1).to_bytes(8, "little"))
    g.vm.write_phys(new, (2).to_bytes(8, "little"))
    v = g.vcpu
    v.set_sregs(cr3=g.pt.cr3, **LONG_MODE)
    assert v.access(0x40_0000, 8, "read").fault is None
    assert v.access(0x40_1000, 8, "read").value == 1
    flooded = g.vm.stats["mmu_flooded"]
    Emulator(v).write(pte0 + 6, 4, ((new | P | RW | A | D) & 0xFFFF) << 16, cpl=0)
    assert int.from_bytes(g.vm.read_phys(pte0 + 8, 8), "little") == new | P | RW | A | D
    assert g.vm.stats["mmu_flooded"] - flooded == (0 if deviations else 1)
    v.invlpg(0x40_1000)
    after_invlpg = v.access(0x40_1000, 8, "read").value
    v.write_cr3(g.pt.cr3)
    after_reload = v.access(0x40_1000, 8, "read").value
    assert (after_invlpg, after_reload) == ((1, 1) if deviations else (2, 2))
    assert v.access(0x40_0000, 8, "read").fault is None
    g.vm.audit()


@pytest.mark.parametrize("deviations", [False, True])
def test_an_access_straddling_the_canonical_boundary_is_a_pf_only_with_kvm_deviations(deviations: bool) -> None:
    """emulate.c, __linearize: in 64-bit mode only the first byte's address is checked; then
    emulator_read_write writes the first page and walks 0x800000000000 (PML4 slot 256, not present:
    #PF, CR2 = that address).  SDM: #GP(0) when any byte is non-canonical, nothing written."""
    import dataclasses

    from kvmmu.guest.runtime import Map, Program
    from kvmmu.kvm.profiles import PROFILES
    from kvmmu.realdiff import run_model
    prog = Program("straddle", "mov rdi, 0x7ffffffffffe\nmov eax, 0xaabbccdd\nmov [rdi], eax\nf1: hlt",
                   maps=(Map(0x7FFF_FFFF_F000, 0x1000, 0x60_0000, "rw"),), data={0x60_0000: b"\x11" * 4096},
                   faults={"pf": "resume", "gp": "resume"}, fixup="f1")
    obs = run_model(prog, dataclasses.replace(PROFILES["kvm-pvm"], kvm_deviations=deviations))
    [fault] = obs.faults
    if deviations:
        assert (fault.vector, fault.error_code, fault.cr2) == (14, 0x2, 0x8000_0000_0000)
        assert obs.memory[0x60_0000][-2:] == b"\xdd\xcc"
    else:
        assert (fault.vector, fault.error_code) == (13, 0)
        assert obs.memory[0x60_0000][-2:] == b"\x11\x11"
