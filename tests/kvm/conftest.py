"""Fixtures for the KVM scenario tests (shadow paging unless a test says otherwise)."""

from __future__ import annotations

import pytest

from tests.kvm.harness import Guest


@pytest.fixture
def guest() -> Guest:
    """Shadow paging, today's generation-numbered MMIO sptes, one vCPU in 4-level long mode."""
    return Guest()
