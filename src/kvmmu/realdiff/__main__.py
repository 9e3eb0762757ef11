"""``python -m kvmmu.realdiff PATH...``."""

from .cli import main

raise SystemExit(main())
