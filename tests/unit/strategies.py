"""Shared hypothesis settings and strategies of the property tests (test_properties_*.py)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def fast(examples: int) -> settings:
    """Few examples, no deadline (the machine is shared), no example database on disk."""
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


# Any JSON document: what a hostile client or folder may send.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=10,
)  # fmt: skip
