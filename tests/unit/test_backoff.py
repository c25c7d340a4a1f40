"""Unit tests of the respawn plugin's backoff."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pycluster.plugins.respawn import backoff


def test_first_replacement_is_immediate_then_doubles_to_the_cap():
    """No delay after a first quick death, then min_delay doubling, capped at max_delay."""
    assert [backoff(n, 0.1, 1.0) for n in range(7)] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


@given(st.integers(min_value=0, max_value=10_000),
       st.floats(min_value=0, max_value=60), st.floats(min_value=0, max_value=3600))
def test_backoff_never_exceeds_the_cap_nor_overflows(misses, low, high):
    """Whatever the number of misses, the delay is finite, >= 0 and at most max_delay."""
    delay = backoff(misses, low, high)
    assert 0.0 <= delay <= max(high, 0.0)
