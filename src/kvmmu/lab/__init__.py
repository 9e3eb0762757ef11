"""The nested real-KVM lab: a stock Debian kernel's KVM (MMIO caching on, TDP MMU, legacy MMU or
shadow paging on SVM) running in QEMU TCG, driven by the project's own real backend.

- `setup`     packages, the kernel, the initramfs (a cache dir, once)
- `qemu`      one L1 boot running one job
- `run`       a capture: a configuration x a corpus -> a results file
- `guest`     the job inside L1 (``python -m kvmmu.lab.guest SPEC.json``)
- `trace`     tracefs control and line parsing
- `record`    observations to JSON and back
- `compare`   the model under a host profile against recorded observations
- `configs`   the KVM configurations and their profiles
"""

from .configs import CONFIGS, LabConfig, get_config

__all__ = ["CONFIGS", "LabConfig", "get_config"]
