"""Open model bugs the fuzzer found (docs/reliability.md, "Known open bugs").

Their reproducers stay in the suite and run on every `make test`; until each bug is fixed its test
is an expected failure, so a fix shows up as XPASS and the mark must then be removed.  The state
machine reaches these bugs quickly, so its fast profile is expected to fail for the same reasons.
"""

from __future__ import annotations

import pytest

OPEN_BUGS = {
    "test_tdp_guest_makes_progress_under_host_memory_pressure": "bug 9: host reclaim can evict a page the "
    "2-D walk needs, a livelock under extreme pressure",
    "test_guest_cannot_tell_escape_or_crash": "the state machine reaches open bugs 1, 2, 4, 5, 8 within its "
    "fast profile",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = item.name.split("[")[0]
        if name in OPEN_BUGS:
            item.add_marker(pytest.mark.xfail(strict=False, reason=OPEN_BUGS[name]))
