"""Stateful fuzzing of kvmmu against an architectural reference (docs/reliability.md)."""
