"""`make demo`: walk a few addresses through every paging mode and print translations and faults."""

from __future__ import annotations

from typing import TextIO

from ..arch import PagingContext, walk
from ..arch.bits import PFERR_FETCH_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK
from ..hw.memory import SparseMemory


def _build(mode: str, mem: SparseMemory) -> int:
    """Map 0x400000 (user, RW), 0x401000 (supervisor, RO) and a large page at 0x800000."""
    if mode == "32bit":
        mem.write(0x1000, 4, 0x2000 | 7)                 # PDE[1] -> PT
        mem.write(0x1000 + 4 * 1, 4, 0x2000 | 7)
        mem.write(0x2000, 4, 0x10000 | 7)
        mem.write(0x2004, 4, 0x11000 | 1)
        mem.write(0x1000 + 4 * 2, 4, 0x00C00000 | 0x87)  # 4 MiB page at 0x800000 -> PA 0xC00000
        return 0x1000
    levels = {"pae": 3, "4level": 4, "5level": 5}[mode]
    table = 0x1000
    root = table
    nxt = 0x2000
    for lvl in range(levels, 2, -1):
        shift = 12 + 9 * (lvl - 1)
        idx = (0x400000 >> shift) & (3 if mode == "pae" and lvl == 3 else 511)
        mem.write(table + 8 * idx, 8, nxt | (1 if mode == "pae" and lvl == 3 else 7))
        table, nxt = nxt, nxt + 0x1000
    mem.write(table + 8 * 2, 8, nxt | 7)                 # PDE[2] (0x400000) -> PT
    mem.write(table + 8 * 4, 8, 0xC00000 | 0x87)         # PDE[4] (0x800000): 2 MiB page
    mem.write(nxt, 8, 0x10000 | 7)
    mem.write(nxt + 8, 8, 0x11000 | 1 | (1 << 63))       # supervisor, read-only, NX
    return root


def run_demo(out: TextIO, seed: int = 1) -> None:
    kinds = (("read", 0), ("user write", PFERR_WRITE_MASK | PFERR_USER_MASK), ("fetch", PFERR_FETCH_MASK))
    print("kvmmu demo: one walker, every paging mode", file=out)
    for mode in ("32bit", "pae", "4level", "5level"):
        mem = SparseMemory()
        root = _build(mode, mem)
        ctx = PagingContext(mode, nxe=mode != "32bit", wp=True, pse=True)
        print(f"\n{mode}: CR3={root:#x} {ctx}", file=out)
        for gva in (0x400123, 0x401456, 0x812345):
            for name, access in kinds:
                w = walk(ctx, mem, root, gva, access)
                if w.fault:
                    what = f"#PF error code {w.error_code:#x}" if w.fault == 14 else f"fault {w.fault}"
                else:
                    what = f"gpa {w.gpa:#x} (level-{w.level} leaf, access {w.pte_access:03b})"
                print(f"  {name:>10} {gva:#10x} -> {what}", file=out)
