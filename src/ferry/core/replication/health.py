"""Replication cycles as recorded, and what they say: health and statistics.

The field names of :class:`CycleStatistics` are the JSON names of
``replication status`` and ``measure`` (CLI.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypedDict

from ferry.core.replication.lifecycle import ReplicationState
from ferry.errors import InvalidInputError

S = ReplicationState


class CycleKind(StrEnum):
    SUCCESS = "success"
    MISS = "miss"  # could not start within one period of its due time
    FAILURE = "failure"
    NETWORK_FAILURE = "network-failure"


# Built once: a catalog read validates every record (a day at 5 s is 17,280 of them).
_KINDS = frozenset(kind.value for kind in CycleKind)


@dataclass(frozen=True)
class CycleRecord:
    """What one cycle did.

    ``started`` is the cycle's point in time (when QEMU froze the bitmap; for a
    miss, its due time), ``bytes`` the delta bytes sent, ``kind`` a
    :class:`CycleKind` value and ``ok`` true exactly for a success.
    """

    started: float
    ok: bool
    kind: str
    bytes: int
    duration_s: float

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidInputError(f"unknown cycle kind {self.kind!r}")
        if self.ok != (self.kind == CycleKind.SUCCESS):
            raise InvalidInputError(f"a {self.kind} cycle cannot have ok={self.ok}")


class Health(StrEnum):
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class HealthReport:
    health: Health
    reasons: tuple[str, ...]


BAD_CYCLE_SHARE = 0.2
STALE_WARNING_S = 3600.0
STALE_CRITICAL_S = 4 * 3600.0
_BAD = frozenset({CycleKind.MISS, CycleKind.FAILURE, CycleKind.NETWORK_FAILURE})
# State alone decides the floor; the cycle rules can only raise it.
_STATE_HEALTH: dict[ReplicationState, tuple[Health, str]] = {
    S.ERROR: (Health.CRITICAL, "replication stopped with an error"),
    S.PAUSED: (Health.WARNING, "replication is paused"),
    S.FAILED_OVER: (Health.WARNING, "failed over; the VM is unprotected until reversed"),
    S.REMOVED: (Health.CRITICAL, "replication was removed"),
}
# Nothing replicates in these by design: the state is the whole verdict.
_STATE_ONLY = frozenset({S.FAILED_OVER, S.REMOVED})


def assess_health(
    state: ReplicationState,
    cycles: Sequence[CycleRecord],
    *,
    now: float,
    frequency_s: int,
    window_s: float = 3600.0,
    last_success: float | None,
    since: float | None = None,
) -> HealthReport:
    """Health with the reasons behind it (see :func:`health` for the rules)."""
    found: list[tuple[Health, str]] = []
    if state in _STATE_HEALTH:
        found.append(_STATE_HEALTH[state])
    if state in _STATE_ONLY:
        return HealthReport(found[0][0], (found[0][1],))
    start = now - window_s if since is None else max(now - window_s, since)
    expected = max(1, int((now - start) // frequency_s))
    bad = sum(1 for c in cycles if start < c.started <= now and c.kind in _BAD)
    if bad > BAD_CYCLE_SHARE * expected:
        found.append((Health.WARNING, f"{bad} of {expected} expected cycles were missed or failed"))
    # Without a success yet, staleness counts from the start, except while the
    # initial copy runs.
    reference = last_success if last_success is not None else since
    if reference is not None and not (last_success is None and state is S.INITIAL_COPY):
        stale = now - reference
        if stale > STALE_CRITICAL_S:
            found.append((Health.CRITICAL, f"nothing replicated for {stale / 3600:.1f} h"))
        elif stale > STALE_WARNING_S:
            found.append((Health.WARNING, f"nothing replicated for {stale / 60:.0f} min"))
    order = list(Health)
    worst = max((h for h, _ in found), key=order.index, default=Health.NORMAL)
    return HealthReport(worst, tuple(reason for _, reason in found))


def health(
    state: ReplicationState,
    cycles: Sequence[CycleRecord],
    *,
    now: float,
    frequency_s: int,
    window_s: float = 3600.0,
    last_success: float | None,
    since: float | None = None,
) -> Health:
    """normal, warning or critical, the way ``replication status`` reports it.

    Rules (the worst that applies wins):

    - ``error`` and ``removed`` are critical: replication stopped and needs an
      admin. ``paused`` and ``failed-over`` are at least warning.
    - warning when the cycles in the window ``(now - window_s, now]`` that
      were missed or failed (any failure kind) are *over* 20% of the cycles
      expected in it, ``window_s // frequency_s`` (at least 1). ``since``, when
      the relationship started, shortens the window of a young relationship.
    - warning when nothing replicated for over an hour (``now - last_success >
      STALE_WARNING_S``), critical past four hours (``STALE_CRITICAL_S``):
      whatever the state says, replication has then in effect stopped, be it
      a long pause or a run of failures. ``last_success`` is the point in time
      of the replica's latest recovery point (the initial copy counts). While
      ``last_success`` is None the stale rule needs ``since`` and does not
      apply to ``initial-copy``: a full copy may rightly take hours.
    """
    report = assess_health(
        state,
        cycles,
        now=now,
        frequency_s=frequency_s,
        window_s=window_s,
        last_success=last_success,
        since=since,
    )
    return report.health


class CycleStatistics(TypedDict):
    """Cycle figures of ``replication status`` / ``measure`` (JSON field names).

    ``failure_count`` counts every failed cycle, network failures included;
    ``network_failure_count`` is that subset. Sizes and times are over the
    successful cycles (None when there is none). ``last_replication_time`` is
    when the latest recovery point became available on the replica (its
    cycle's end); ``lag_s`` how old that point's content is (now minus its
    point in time).
    """

    success_count: int
    miss_count: int
    failure_count: int
    network_failure_count: int
    replicated_bytes: int
    average_delta_bytes: int | None
    max_delta_bytes: int | None
    average_cycle_s: float | None
    max_cycle_s: float | None
    last_replication_time: float | None
    lag_s: float | None


def latest_point_time(cycles: Sequence[CycleRecord]) -> float | None:
    """The point in time of the latest successful cycle (``health``'s ``last_success``)."""
    return max((c.started for c in cycles if c.ok), default=None)


def statistics(cycles: Sequence[CycleRecord], now: float) -> CycleStatistics:
    ok = [c for c in cycles if c.ok]
    kinds = [c.kind for c in cycles]
    newest = max(ok, key=lambda c: c.started, default=None)
    return CycleStatistics(
        success_count=len(ok),
        miss_count=kinds.count(CycleKind.MISS),
        failure_count=kinds.count(CycleKind.FAILURE) + kinds.count(CycleKind.NETWORK_FAILURE),
        network_failure_count=kinds.count(CycleKind.NETWORK_FAILURE),
        replicated_bytes=sum(c.bytes for c in ok),
        average_delta_bytes=round(sum(c.bytes for c in ok) / len(ok)) if ok else None,
        max_delta_bytes=max((c.bytes for c in ok), default=None),
        average_cycle_s=sum(c.duration_s for c in ok) / len(ok) if ok else None,
        max_cycle_s=max((c.duration_s for c in ok), default=None),
        last_replication_time=newest.started + newest.duration_s if newest else None,
        # A replica clock ahead of ours must not show a negative lag.
        lag_s=max(0.0, now - newest.started) if newest else None,
    )
