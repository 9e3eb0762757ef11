"""The differential runner moved to the package `kvmmu.realdiff`; this name re-exports it (and
``python -m kvmmu.report.realdiff`` still runs ``kvmmu real-diff``)."""

from __future__ import annotations

from ..realdiff import *  # noqa: F403
from ..realdiff import __all__ as __all__  # noqa: PLC0414
from ..realdiff import main

if __name__ == "__main__":
    raise SystemExit(main())
