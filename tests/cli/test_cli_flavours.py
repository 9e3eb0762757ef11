"""`kvmmu flavours`, `kvmmu linux-boot` and `kvmmu real-diff` on the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvmmu.report.flavours import run_flavour


def _kvmmu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmmu.cli", *args], capture_output=True, text=True, timeout=300)


def test_flavours_table_has_every_mmu() -> None:
    r = _kvmmu("flavours", "--iterations", "60")
    assert r.returncode == 0, r.stderr
    header = [line for line in r.stdout.splitlines() if "nested-ept" in line and "shadow" in line]
    assert header and all(f in header[0] for f in ("shadow", "ept", "npt", "nested-ept"))


def test_nested_guest_never_hits_the_mmio_cache() -> None:
    """§3.10: while L2 runs the per-vCPU cache never matches, so the emulator walks L2's tables
    through L1's EPT on every MMIO access, where a non-nested EPT guest needs no walk at all."""
    ept, nested = run_flavour("ept", iterations=50), run_flavour("nested-ept", iterations=50)
    assert nested.counters["mmio_cache_hits"] == 0
    assert ept.counters["guest_walks"] == 0 and nested.counters["guest_walks"] >= 2 * 50
    assert nested.stats["mmio_exits"] == ept.stats["mmio_exits"] == 2 * 50


@pytest.mark.parametrize("args", [("flavours", "--mmus", "bogus"), ("flavours", "--iterations", "0"),
                                  ("linux-boot", "--limit", "-5"), ("linux-boot", "--policies", "sometimes")])
def test_bad_arguments_exit_2_with_one_line(args: tuple[str, ...]) -> None:
    r = _kvmmu(*args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("kvmmu: error:")


def test_linux_boot_short_replay() -> None:
    r = _kvmmu("linux-boot", "--limit", "400", "--mmus", "shadow", "--policies", "generation")
    assert r.returncode == 0, r.stderr
    assert "What the model makes of it" in r.stdout


def test_real_diff_is_registered() -> None:
    r = _kvmmu("real-diff", "--help")
    assert r.returncode == 0 and "model" in r.stdout
