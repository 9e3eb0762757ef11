"""The driver loop that `policy_matrix` (MMU flavours x MMIO policies) and `kvmmu flavours` share.

The address space is checked by walking the built tables by hand (SDM Vol. 3A 4.5: 4-level paging,
nine index bits per level from bit 39 down, PS in a PDE maps 2 MiB, PCD is bit 4), and the two
entry points are checked to run the same workload: outside nested EPT, `run_flavour` and
`driver_loop` give the same KVM counters, and every iteration makes its two device accesses exit to
userspace once each (no in-kernel device is registered).
"""
import pytest

from kvmmu.report.experiments import DIRECT_MAP, DOORBELL_GPA, IOREMAP, RAM, driver_loop, driver_page_tables
from kvmmu.report.flavours import run_flavour
from kvmmu.sim.cost import CostModel

P, RW, PCD, PS = 1 << 0, 1 << 1, 1 << 4, 1 << 7
FRAME = ((1 << 52) - 1) & ~0xFFF


def _walk(mem: dict[int, int], cr3: int, va: int) -> tuple[int, int, int]:
    """(physical address, leaf entry, leaf level) of `va` in 4-level tables held in `mem`."""
    table = cr3 & FRAME
    for level in (4, 3, 2, 1):
        entry = mem.get(table + 8 * ((va >> (12 + 9 * (level - 1))) & 0x1FF), 0)
        assert entry & P, f"{va:#x}: not present at level {level}"
        if level == 2 and entry & PS:
            return (entry & FRAME & ~0x1FFFFF) | (va & 0x1FFFFF), entry, 2
        table = entry & FRAME
    return table | (va & 0xFFF), entry, 1


def test_the_address_space_maps_ram_with_2m_pages_and_the_device_uncached() -> None:
    mem: dict[int, int] = {}

    def write(gpa: int, size: int, value: int) -> None:
        assert size == 8
        mem[gpa] = value

    pt = driver_page_tables(write, lambda gpa, size: mem.get(gpa, 0))
    for off in (0, 2 << 20, RAM - (2 << 20)):
        pa, entry, level = _walk(mem, pt.cr3, DIRECT_MAP + off + 0x1234)
        assert (pa, level) == (off + 0x1234, 2) and entry & RW and not entry & PCD
    for page in (0, 0x1000):
        pa, entry, level = _walk(mem, pt.cr3, IOREMAP + page + 4)
        assert (pa, level) == (DOORBELL_GPA + page + 4, 1) and entry & RW and entry & PCD


@pytest.mark.parametrize("flavour", ["shadow", "ept"])
def test_flavours_and_the_policy_run_share_one_workload(flavour: str) -> None:
    iterations = 60
    a = driver_loop(flavour, "generation", iterations=iterations, seed=5)
    b = run_flavour(flavour, "generation", iterations=iterations, seed=5)
    assert (a.stats, a.counters, a.vm_stats) == (b.stats, b.counters, b.vm_stats)
    for r in (a, b):
        assert r.mmio_accesses == 2 * iterations
        assert r.stats["mmio_exits"] == 2 * iterations
        assert r.cycles == CostModel().cycles(r.stats, r.counters)
