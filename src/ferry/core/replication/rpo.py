"""The recovery point objective a relationship actually achieved, from its cycle records.

At any instant the RPO is how much would be lost by a failover then: now
minus the point in time of the replica's latest recovery point. It is a saw
tooth: it grows until the next point is linked (that cycle's end), then drops
to that cycle's duration. Its peaks, ``end of cycle i - point in time of
cycle i-1``, are the worst it got; ``rpo_p99_s`` is the 99th percentile of
those peaks in a window (plus the current, still growing, one), so a single
slow cycle shows and a run of them dominates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from ferry.core.replication.health import CycleRecord

RPO_WINDOW_S = 900.0


@dataclass(frozen=True)
class Rpo:
    """``rpo_s``: now; ``rpo_p99_s``: the p99 of the peaks in the window (None: no point yet)."""

    rpo_s: float | None
    rpo_p99_s: float | None


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank of non-empty ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def rpo(cycles: Sequence[CycleRecord], now: float, *, window_s: float = RPO_WINDOW_S) -> Rpo:
    """The RPO now and its p99 over the last ``window_s`` seconds."""
    ok = sorted((c for c in cycles if c.ok), key=lambda c: c.started)
    if not ok:
        return Rpo(None, None)
    current = max(0.0, now - ok[-1].started)
    peaks = [
        max(0.0, cycle.started + cycle.duration_s - before.started)
        for before, cycle in pairwise(ok)
        if cycle.started + cycle.duration_s > now - window_s
    ]
    return Rpo(current, nearest_rank([*peaks, current], 0.99))
