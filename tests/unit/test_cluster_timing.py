"""Cluster timings: derived from the lease TTL, and every safety inequality enforced."""

from __future__ import annotations

import dataclasses

import pytest

from ferry.core.cluster.timing import ClusterTimings
from ferry.errors import ConfigError


@pytest.mark.parametrize("ttl", [2, 3, 4, 10, 30, 300])
def test_every_ttl_in_range_gives_safe_timings(ttl: int) -> None:
    t = ClusterTimings.from_ttl(ttl)
    assert t.renew_interval_s == ttl / 4
    assert t.guard_limit_s < t.self_fence_s < t.ttl_s
    assert t.renew_interval_s * 2 < t.self_fence_s
    assert t.guard_limit_s + t.renew_timeout_s <= t.self_fence_s


def test_the_default_ttl_of_ten_seconds() -> None:
    t = ClusterTimings.from_ttl(10)
    assert (t.renew_interval_s, t.self_fence_s, t.guard_limit_s) == (2.5, 8.0, 6.75)
    assert (t.renew_timeout_s, t.retry_interval_s) == (1.25, 0.625)
    assert t.loop_lag_limit_s == 1.0


@pytest.mark.parametrize("ttl", [0, 1, 301, -4])
def test_a_ttl_out_of_range_is_refused(ttl: int) -> None:
    with pytest.raises(ConfigError, match=r"lease TTL must be 2\.\.300 s"):
        ClusterTimings.from_ttl(ttl)


@pytest.mark.parametrize("ttl", [4.5, "4", True])
def test_a_ttl_that_is_not_whole_seconds_is_refused(ttl: object) -> None:
    with pytest.raises(ConfigError, match="whole seconds"):
        ClusterTimings.from_ttl(ttl)  # type: ignore[arg-type]


# Each change makes a safe set (TTL 4: renew 1, timeout 0.5, retry 0.25, fence 3.2,
# guard 2.7, lag 0.4)
# unsafe; the message names the first rule it breaks.
BROKEN = [
    ({"guard_limit_s": 3.2}, "guard limit < self-fence deadline"),
    ({"guard_limit_s": 0.0}, "guard limit < self-fence deadline"),
    ({"self_fence_s": 4.0, "loop_lag_limit_s": 0.01}, "self-fence deadline < lease TTL"),
    ({"renew_interval_s": 1.6}, "renew interval \\* 2 < self-fence deadline"),
    ({"renew_timeout_s": 1.0}, "guard limit \\+ renew timeout <= self-fence deadline"),
    ({"retry_interval_s": 1.5}, "retry interval <= renew interval"),
    ({"loop_lag_limit_s": 0.8}, "loop-lag limit < lease TTL - self-fence deadline"),
    ({"leader_poll_s": 0.0}, "every interval must be positive"),
    ({"ttl_s": 1}, "the lease TTL must be 2..300 s"),
]


@pytest.mark.parametrize(("change", "rule"), BROKEN)
def test_each_inequality_is_enforced_at_construction(change: dict[str, float], rule: str) -> None:
    safe = ClusterTimings.from_ttl(4)
    with pytest.raises(ConfigError, match=f"unsafe cluster timings .*need {rule}"):
        dataclasses.replace(safe, **change)  # type: ignore[arg-type]
