"""Every hypothesis run draws its examples from its seed alone.

Hypothesis (6.13x and later) also draws, a few percent of the time, integers and strings it finds
in the source of every non-test module imported so far ("local constants", collected anew whenever
sys.modules grows).  Which kvmmu modules a pytest process has imported depends on the tests that
ran before in it, so a derandomized test got different examples in a fresh process, in a full
`pytest -n 2` worker and in a worker of a partial run: test_fuzz.py's state machine failed in one
combined run and passed alone.  Here the local constants are always empty, so a seed (derandomized:
the test's own digest; `--hypothesis-seed`) names one run everywhere.  Hypothesis's built-in
constants stay; they do not depend on what is imported.  tests/test_determinism.py checks it.

Nor does any test depend on the wall clock: hypothesis's default 200 ms deadline per example would
fail a test whenever the shared 2-core machine stalls a worker, so the default profile has none
(the tests that name a deadline already say None).
"""

from __future__ import annotations


def _pin_hypothesis_local_constants() -> None:
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:          # no hypothesis: nothing draws
        return
    if not hasattr(providers, "_get_local_constants"):
        return                   # a hypothesis without local constants
    empty = providers.Constants()
    providers._get_local_constants = lambda: empty
    providers.CONSTANTS_CACHE.cache.clear()


_pin_hypothesis_local_constants()

try:
    from hypothesis import settings
except ImportError:
    pass
else:
    settings.register_profile("kvmmu", deadline=None)
    settings.load_profile("kvmmu")
