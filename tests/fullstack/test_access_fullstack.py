"""The permission enumeration through the full stack: the guest writes its own page tables through
its vCPU (at CPL0, onto pages KVM keeps write-protected), runs INVLPG, sets its control registers,
then makes the access.  Fault, error code and every paging entry afterwards must equal the
independent oracle (tests/oracle), and vm.audit() must stay clean after every case.

Guest-visible A/D behaviour is a property of the MMU flavour (docs/spec/kvm-pvm-host.md §2): under shadow paging
KVM's software walker writes A/D only on success ("kvm" policy); under EPT/NPT the CPU walks the
guest tables itself and sets A on the upper levels it used ("hardware" policy).  The table pool
is identity-mapped through separate top-level entries so the guest can reach its own tables.
"""

from __future__ import annotations

import pytest

import kvmmu
from kvmmu.guest.pagetables import RW, P
from tests.oracle import access_rules as R
from tests.oracle.access_cases import random_cases

FLAVOURS = ("shadow", "ept", "npt")
AD_OF = {"shadow": "kvm", "ept": "hardware", "npt": "hardware"}
IDENT_POOL = 40 << 20          # tables of the identity map (never touched by the oracle's layout)
IDENT_SPAN = (R.POOL, R.POOL + 0x8000)


class Rig:
    """One VM per (flavour, mode, MAXPHYADDR), reused across cases as access.c reuses its tables."""

    def __init__(self, flavour: str, mode: str, maxphyaddr: int) -> None:
        self.mode = mode
        self.vm = kvmmu.VM(mmu=flavour, guest_maxphyaddr=maxphyaddr)
        self.vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory_size=64 << 20)
        self.esize = R.entry_size(mode)
        self._ident_next = IDENT_POOL
        first = R.Case(mode, R.PDE_P | R.PTE_P, maxphyaddr)
        R.layout(first, self._vmm_write)
        self._identity_map()
        self.vcpu = self.vm.create_vcpu()
        st = R.cpu_state(first)
        self.vcpu.set_sregs(cr0=st.cr0, cr3=st.cr3, cr4=st.cr4, efer=st.efer & ~R.EFER_LMA_BIT)
        self.state = st

    def _vmm_write(self, addr: int, size: int, value: int) -> None:
        self.vm.write_phys(addr, value.to_bytes(size, "little"))

    def _read(self, addr: int, size: int) -> int:
        return int.from_bytes(self.vm.read_phys(addr, size), "little")

    def _new_table(self) -> int:
        t = self._ident_next
        self._ident_next += 0x1000
        return t

    def _identity_map(self) -> None:
        """Map the oracle's table pool at gva == gpa, supervisor-only, without touching the oracle's
        entries (its linear address uses other indexes at every level)."""
        mode, esz = self.mode, self.esize
        top = R.levels(mode)[0]
        for gpa in range(*IDENT_SPAN, 0x1000):
            table = R.root(mode) if mode != "pae" else R.POOL + 0x20
            for lvl in R.levels(mode)[:-1]:
                addr = table + esz * R.index(mode, lvl, gpa)
                entry = self._read(addr, esz)
                if not entry & P:
                    child = self._new_table()
                    entry = child | (P if mode == "pae" and lvl == 3 else P | RW)
                    self._vmm_write(addr, esz, entry)
                table = entry & (0xFFFFF000 if esz == 4 else 0xFFFFFFFFFF000)
                assert lvl != top or R.index(mode, lvl, gpa) != R.index(mode, lvl, R.linear_address(mode))
            self._vmm_write(table + esz * R.index(mode, 1, gpa), esz, gpa | P | RW)

    # -- the guest's side -----------------------------------------------------------------------
    def guest_write(self, addr: int, size: int, value: int) -> None:
        if self._read(addr, size) == value:
            return                                   # like access.c: write only what changes
        r = self.vcpu.access(addr, size, "write", value, cpl=0)
        assert r.fault is None, f"the guest's store to its page table at {addr:#x} faulted: {r.fault}"

    def set_cpu(self, st: R.CpuState) -> None:
        v = self.vcpu
        if st.efer != self.state.efer:
            v.write_efer(st.efer & ~R.EFER_LMA_BIT)
        if st.cr4 != self.state.cr4:
            v.write_cr4(st.cr4)
        if st.cr0 != self.state.cr0:
            v.write_cr0(st.cr0)
        v.rflags = st.rflags
        v.pkru = st.pkru
        self.state = st

    def run(self, case: R.Case) -> None:
        lay = R.layout(case, self.guest_write)
        self.set_cpu(R.cpu_state(case))
        self.vcpu.invlpg(lay.la)
        access = "write" if case.has(R.WRITE) else "fetch" if case.has(R.FETCH) else "read"
        st = R.cpu_state(case)
        if case.has(R.TWICE):
            self.vcpu.access(lay.la, 1, "read", cpl=0)
        if case.prior is not None:
            cpl, kind = case.prior
            self.vcpu.access(lay.la, 1, kind, 0xC3 if kind == "write" else None, cpl=cpl)
        value = 0xC3 if access == "write" else None
        r = self.vcpu.access(lay.la, 1, access, value, cpl=st.cpl, implicit=case.has(R.IMPLICIT))
        exp = R.expected(case)
        got_fault = r.fault is not None
        assert got_fault == exp.fault, f"{case}: fault {r.fault}, expected {'a fault' if exp.fault else 'none'}"
        if exp.fault:
            assert r.fault.vector == 14 and r.fault.error_code == exp.error_code, \
                f"{case}: error code {r.fault.error_code:#x}, expected {exp.error_code:#x}"
        addrs = R.entry_addresses(case.mode)
        for lvl, want in exp.entries.items():
            got = self._read(addrs[lvl], self.esize)
            assert got == want, f"{case}: level-{lvl} entry {got:#x}, expected {want:#x}"
        self.vm.audit()


_RIGS: dict[tuple[str, str, int], Rig] = {}


def _rig(flavour: str, mode: str, maxphyaddr: int) -> Rig:
    key = (flavour, mode, maxphyaddr)
    if key not in _RIGS:
        _RIGS[key] = Rig(flavour, mode, maxphyaddr)
    return _RIGS[key]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("mode", R.MODES)
def test_fullstack_matches_oracle(flavour: str, mode: str) -> None:
    """Every access through the full stack agrees with the SDM rules (a seeded slice)."""
    for case in random_cases(mode, 150, seed=7, ad_policy=AD_OF[flavour], maxphyaddrs=(46,)):
        _rig(flavour, mode, case.maxphyaddr).run(case)


@pytest.mark.full
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("mode", R.MODES)
def test_fullstack_matches_oracle_deep(flavour: str, mode: str) -> None:
    """The same, on a much larger sample and every MAXPHYADDR the oracle knows."""
    for case in random_cases(mode, 20000, seed=11, ad_policy=AD_OF[flavour]):
        _rig(flavour, mode, case.maxphyaddr).run(case)
