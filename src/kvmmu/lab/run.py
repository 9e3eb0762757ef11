"""One capture on the host side: boot L1 with a configuration, run the corpus there, fetch the results."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from .configs import LabConfig, expected_readback
from .qemu import CPU, boot, new_run_dir
from .record import load_results
from .setup import LabError, LabKernel, cache_dir


def _inside_tmp(p: Path) -> bool:
    return p == Path("/tmp") or Path("/tmp") in p.parents


def capture(config: LabConfig, mmio_caching: bool, paths: list[str], k: list[str] | None = None,
            repeats: int = 3, timeout: float = 7200.0, root: Path | None = None,
            quiet: bool = False) -> tuple[dict[str, Any], Path]:
    """Run ``paths`` (corpus folders/files) on real KVM in L1; returns (results, run directory)."""
    root = (root or cache_dir()).resolve()
    lab = LabKernel.load(root)
    if lab is None:
        raise LabError("the lab is not set up: run `kvmmu lab setup` first")
    # L1 sees the host's root, but its /tmp is a fresh tmpfs: nothing under /tmp is visible there.
    resolved = [str(Path(p).resolve()) for p in paths]
    for what, p in [("cache", root), *(("corpus", Path(x)) for x in resolved)]:
        if _inside_tmp(Path(p)):
            raise LabError(f"{what} path {str(p)!r} is under /tmp, which L1 does not see (a tmpfs there)")
        if not Path(p).exists():
            raise LabError(f"{what} path {str(p)!r} does not exist")
    run_dir = new_run_dir(config.label(mmio_caching), root)
    out = run_dir / "results.json"
    spec = {"paths": resolved, "k": k or [], "out": str(out), "repeats": repeats, "config": config.name,
            "mmio_caching": mmio_caching, "profile": config.profile_name(mmio_caching), "cpu": CPU,
            "source": lab.source}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1) + "\n")
    src = Path(__file__).resolve().parents[2]
    job = (f"cd / && PYTHONDONTWRITEBYTECODE=1 PYTHONPATH={shlex.quote(str(src))} "
           f"{shlex.quote(sys.executable)} -m kvmmu.lab.guest {shlex.quote(str(run_dir / 'spec.json'))}")
    kvm, amd = config.params(mmio_caching)
    b = boot(lab, run_dir, kvm, amd, job, timeout=timeout, quiet=quiet)
    if b.returncode != 0 or not out.exists():
        tail = "\n".join((b.job_log or b.serial).strip().splitlines()[-8:])
        raise LabError(f"the lab job failed (rc={b.returncode}, {run_dir}):\n{tail}")
    results = load_results(out)
    want = expected_readback(config, mmio_caching)
    got = results.get("parameters", {})
    wrong = {k: got.get(k) for k, v in want.items() if got.get(k) != v}
    if wrong:
        raise LabError(f"L1's KVM did not take the parameters: wanted {want}, /sys/module shows {wrong}")
    results["boot_seconds"] = round(b.seconds, 1)
    return results, run_dir


__all__ = ["capture"]
