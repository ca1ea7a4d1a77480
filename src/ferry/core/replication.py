"""Replication relationships as pure rules: life cycle, schedule, retention, health, wire format.

Theory of operation: a *relationship* protects one VM. Its primary host takes a
point-in-time delta of every disk once per ``frequency_s`` (a *cycle*) and
streams it to the replica host, which verifies it, fsyncs it and links it into
a chain of *recovery points*: ``base <- p1 <- p2 <- ... <- latest`` where
``base`` is a full image and every later point a qcow2 overlay on the one
before. Nothing here does I/O; the replication service and its adapters
(QEMU, catalog, peer client) call these rules and do what they say.

Life cycle. A relationship is born ``initial-copy`` and is always in one
:class:`ReplicationState`. Admin requests and things the agent observes are
operations (:class:`ReplicationOp`); :data:`TRANSITIONS` says from which states
each one is allowed and where it leads, and :func:`transition` is the only way
a state changes::

    initial-copy --initial-copy-done--> replicating
    replicating | resynchronising --bitmap-lost--> resynchronising
    resynchronising --resync-done--> replicating
    initial-copy | replicating | resynchronising --fail--> error
    initial-copy | replicating | resynchronising | error --pause--> paused
    paused | error --resume--> replicating
    replicating | resynchronising | paused | error --failover--> failed-over
    failed-over --cancel-failover--> replicating (the failed-over VM is gone)
    failed-over --reverse--> initial-copy (the other way round)
    anything but removed --remove--> removed

A cycle that fails (network down, replica busy) does not change the state: its
bitmap keeps every change and the next cycle resends. Only a failure that a
retry cannot cure (certificate thumbprint mismatch, version refusal, replica
VM moved away, primary not authorised) is ``fail`` -> ``error``; ``set``
(new thumbprint or replica host) or ``resume`` leaves it. ``resume`` always
leads to ``replicating``: the first cycle after it checks that the dirty
bitmap still covers every change since the replica's latest point (the bitmap
is consistent and was started with that point) and otherwise reports
``bitmap-lost``, which resynchronises. This also covers a pause during the
initial copy or a resynchronisation: a half-made copy is only a replica whose
blocks differ, which is what resynchronising repairs.

Also here: the allowed frequencies, recovery point counts and the retention
plan (:class:`Merge`), the functional-level rule between primary and replica,
cycle bookkeeping (:class:`CycleRecord`, :func:`health`, :func:`statistics`,
:func:`next_due`) (:func:`next_due`). The delta stream
between primary and replica is :mod:`ferry.core.delta_stream`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from itertools import pairwise
from typing import TypedDict

from ferry.core import transitions
from ferry.core.units import parse_duration
from ferry.errors import InvalidInputError, VersionError

# --------------------------------------------------------------------------- life cycle


class ReplicationState(StrEnum):
    INITIAL_COPY = "initial-copy"
    REPLICATING = "replicating"
    RESYNCHRONISING = "resynchronising"
    PAUSED = "paused"
    ERROR = "error"
    FAILED_OVER = "failed-over"
    REMOVED = "removed"


class ReplicationOp(StrEnum):
    INITIAL_COPY_DONE = "initial-copy-done"
    BITMAP_LOST = "bitmap-lost"
    RESYNC_DONE = "resync-done"
    PAUSE = "pause"
    RESUME = "resume"
    FAIL = "fail"
    FAILOVER = "failover"
    CANCEL_FAILOVER = "cancel-failover"
    REVERSE = "reverse"
    REMOVE = "remove"


S = ReplicationState
INITIAL_STATE = S.INITIAL_COPY
# States in which cycles (or the initial copy) run on their own.
_RUNNING = frozenset({S.INITIAL_COPY, S.REPLICATING, S.RESYNCHRONISING})

# operation -> (states it is allowed in, state it leads to)
TRANSITIONS: dict[ReplicationOp, tuple[frozenset[ReplicationState], ReplicationState]] = {
    ReplicationOp.INITIAL_COPY_DONE: (frozenset({S.INITIAL_COPY}), S.REPLICATING),
    # Lost again during a resync: start the resync over.
    ReplicationOp.BITMAP_LOST: (frozenset({S.REPLICATING, S.RESYNCHRONISING}), S.RESYNCHRONISING),
    ReplicationOp.RESYNC_DONE: (frozenset({S.RESYNCHRONISING}), S.REPLICATING),
    ReplicationOp.PAUSE: (_RUNNING | {S.ERROR}, S.PAUSED),
    ReplicationOp.RESUME: (frozenset({S.PAUSED, S.ERROR}), S.REPLICATING),
    ReplicationOp.FAIL: (_RUNNING, S.ERROR),
    # Not from initial-copy: there is no recovery point yet. A relationship
    # paused during its initial copy has none either; the failover service
    # checks the catalog for a point, the table cannot know.
    ReplicationOp.FAILOVER: (
        frozenset({S.REPLICATING, S.RESYNCHRONISING, S.PAUSED, S.ERROR}),
        S.FAILED_OVER,
    ),
    # The replica goes back to being one: the failed-over VM is gone.
    ReplicationOp.CANCEL_FAILOVER: (frozenset({S.FAILED_OVER}), S.REPLICATING),
    # The old primary becomes the replica; its disks serve as the initial copy.
    ReplicationOp.REVERSE: (frozenset({S.FAILED_OVER}), S.INITIAL_COPY),
    ReplicationOp.REMOVE: (frozenset(S) - {S.REMOVED}, S.REMOVED),
}


def is_running(state: ReplicationState) -> bool:
    """True while the scheduler should start cycles for the relationship."""
    return state in _RUNNING


def allowed(state: ReplicationState, op: ReplicationOp) -> bool:
    return state in TRANSITIONS[op][0]


def transition(state: ReplicationState, op: ReplicationOp, *, vm: str = "") -> ReplicationState:
    """Return the state ``op`` leads to from ``state``, or raise StateError."""
    who = f"VM {vm!r}" if vm else "the VM"
    return transitions.apply(TRANSITIONS, state, op, subject=f"replication of {who}")


# --------------------------------------------------------------------------- settings


class Frequency(IntEnum):
    """How often a cycle starts, in seconds."""

    THIRTY_SECONDS = 30
    FIVE_MINUTES = 300
    FIFTEEN_MINUTES = 900


DEFAULT_FREQUENCY = Frequency.FIVE_MINUTES
_FREQUENCY_TEXT = {30: "30s", 300: "5m", 900: "15m"}


def check_frequency(seconds: int) -> int:
    """Validate a frequency given in seconds (the API's ``frequency_s``)."""
    if seconds not in set(Frequency):
        raise InvalidInputError(f"invalid replication frequency {seconds}s: use 30s, 5m or 15m")
    return int(seconds)


def parse_frequency(text: str) -> int:
    """Seconds in ``30s``, ``5m`` or ``15m`` (or the same spelt otherwise, ``300s``)."""
    try:
        seconds = parse_duration(text, what="replication frequency")
    except InvalidInputError:
        seconds = 0
    if seconds not in set(Frequency):
        raise InvalidInputError(f"invalid replication frequency {text!r}: use 30s, 5m or 15m")
    return seconds


def format_frequency(seconds: int) -> str:
    return _FREQUENCY_TEXT[check_frequency(seconds)]


# Extended replication (replica -> third host) runs every 5 or 15 minutes,
# never more often than the primary feeds the replica.
EXTENDED_FREQUENCIES = (Frequency.FIVE_MINUTES, Frequency.FIFTEEN_MINUTES)


def check_extended_frequency(seconds: int, primary_seconds: int, *, vm: str = "") -> int:
    """An extended frequency is 5m or 15m and not shorter than the primary's."""
    if seconds not in EXTENDED_FREQUENCIES:
        raise InvalidInputError(f"invalid extended replication frequency {seconds}s: use 5m or 15m")
    if seconds < primary_seconds:
        who = f"VM {vm!r}" if vm else "the VM"
        raise InvalidInputError(
            f"extended replication of {who} every {format_frequency(seconds)} would be more "
            f"often than its primary replicates ({format_frequency(primary_seconds)}); "
            f"use {format_frequency(max(primary_seconds, int(Frequency.FIVE_MINUTES)))} or longer"
        )
    return int(seconds)


def default_extended_frequency(primary_seconds: int) -> int:
    return max(int(Frequency.FIVE_MINUTES), primary_seconds)


DEFAULT_RECOVERY_POINTS = 4
MAX_RECOVERY_POINTS = 24


def check_recovery_points(n: int) -> int:
    """Validate how many recovery points to keep besides the latest (0..24)."""
    if not 0 <= n <= MAX_RECOVERY_POINTS:
        raise InvalidInputError(
            f"invalid number of recovery points {n}: use 0..{MAX_RECOVERY_POINTS} "
            "(the latest point is always kept on top of these)"
        )
    return n


# --------------------------------------------------------------------------- retention


@dataclass(frozen=True)
class PointInfo:
    """One recovery point on the replica: ``file`` reads as the VM's disk at ``time``.

    ``id`` is the point's sequence number within the relationship (the
    ``point_id`` of its delta stream); later points have larger ids.
    """

    id: int
    time: float
    file: str
    size: int = 0


@dataclass(frozen=True)
class Merge:
    """One retention step: fold the oldest overlay into the base file.

    Before the step, ``base_file`` reads as point ``drops`` (the oldest point),
    ``overlay.file`` is a qcow2 whose backing file is ``base_file``, and
    ``rebase.file`` (if any) is a qcow2 whose backing file is ``overlay.file``.
    After it, ``base_file`` reads as point ``overlay``, ``drops`` is gone and
    ``overlay.file`` no longer exists. The adapter runs, in this order:

    1. catalog: point ``drops.id`` is gone (never offered for failover again),
       because step 2 changes what ``base_file`` reads.
    2. ``qemu-img commit -d -f qcow2 {overlay.file}``: writes the overlay's
       clusters into its backing file, ``base_file``. ``-d`` leaves the overlay
       as it was, so ``overlay.file`` still reads the same (its own clusters,
       the rest from a base that did not change there) and a crash here
       leaves a valid chain; redoing the commit writes the same bytes.
    3. when ``rebase`` is not None: ``qemu-img rebase -u -b {base_file} -F qcow2
       {rebase.file}``. Metadata only, and safe because ``base_file`` now reads
       exactly what ``overlay.file`` read. ``rebase`` is None only when the
       overlay was the latest point (``keep=0``): nothing sits on top of it.
    4. catalog: point ``overlay.id`` lives in ``base_file``.
    5. delete ``overlay.file``.

    A plan of several merges runs them in order; each merge's ``drops`` is the
    previous one's ``overlay`` and they share ``base_file``.
    """

    base_file: str
    drops: PointInfo
    overlay: PointInfo
    rebase: PointInfo | None


def retention_plan(
    points: Sequence[PointInfo], keep: int, *, in_use: Collection[int] = frozenset()
) -> list[Merge]:
    """The merges that leave ``keep`` points plus the latest, oldest first.

    ``points`` is the chain oldest first: ``points[0]`` is the base (a full
    image), each later one an overlay on the one before, the last the latest.
    ``in_use`` are ids of points a test failover VM is booted on: a merge that
    would drop, delete or rebase one of them waits (with every merge after it,
    as merges must run in order) until the test ends.
    """
    check_recovery_points(keep)
    ids = [p.id for p in points]
    if any(a >= b for a, b in pairwise(ids)):
        raise InvalidInputError(f"recovery points must be oldest first with rising ids, got {ids}")
    if not points:
        return []
    base_file = points[0].file
    plan: list[Merge] = []
    for i in range(1, len(points) - keep):
        drops, overlay = points[i - 1], points[i]
        rebase = points[i + 1] if i + 1 < len(points) else None
        touched = {drops.id, overlay.id} | ({rebase.id} if rebase else set())
        if touched & set(in_use):
            break
        plan.append(Merge(base_file=base_file, drops=drops, overlay=overlay, rebase=rebase))
    return plan


# --------------------------------------------------------------------------- versions


def check_replica_accepts(
    primary_level: int, replica_level: int, *, primary: str, replica: str, vm: str
) -> None:
    """A replica runs the same or a newer functional level than its primary."""
    if replica_level < primary_level:
        raise VersionError(
            f"replica host {replica!r} runs functional level {replica_level}, older than "
            f"primary host {primary!r} at level {primary_level}: it cannot receive "
            f"replication of VM {vm!r}; upgrade {replica!r} first (replica side before primary)"
        )


def check_reverse_allowed(
    running_level: int, old_primary_level: int, *, running_host: str, old_primary: str, vm: str
) -> None:
    """After failover the old primary becomes the replica: the same rule, reversed.

    ``running_host`` is the old replica where the VM now runs (the new
    primary); ``old_primary`` must run the same or a newer level.
    """
    if old_primary_level < running_level:
        raise VersionError(
            f"cannot reverse replication of VM {vm!r}: old primary host {old_primary!r} "
            f"runs functional level {old_primary_level}, older than host {running_host!r} "
            f"at level {running_level} where the VM now runs; upgrade {old_primary!r} first"
        )


# --------------------------------------------------------------------------- cycles and health


class CycleKind(StrEnum):
    SUCCESS = "success"
    MISS = "miss"  # could not start within one period of its due time
    FAILURE = "failure"
    NETWORK_FAILURE = "network-failure"


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
        if self.kind not in set(CycleKind):
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


# --------------------------------------------------------------------------- scheduling


def next_due(last_started: float | None, frequency_s: int, now: float) -> float:
    """When the next cycle should start; may be in the past (start now).

    Cycles are due one period after the previous cycle *started*, so points
    stay a period apart even after a late start. A due time that passed by a
    whole period or more is missed (:func:`is_missed`); the scheduler records
    a miss for each such slot (:func:`missed_slots`) and this returns the
    latest slot that can still start. So a VM whose cycle overran cannot make
    the scheduler queue a burst of catch-up cycles, and with one task per
    relationship a slow VM delays only itself.
    """
    if last_started is None:
        return now
    return last_started + frequency_s * (1 + missed_slots(last_started, frequency_s, now))


# A paused or failed relationship waits this long between looks at its
# state; resuming it wakes its task at once.
IDLE_DELAY_S = 3600.0


def cycle_delay(state: ReplicationState, last_started: float | None, frequency_s: int,
                now: float, *, not_before: float | None = None) -> float:  # fmt: skip
    """Seconds until the scheduler should start the next cycle.

    ``not_before`` holds back an initial copy scheduled for later. A
    relationship that is not running waits for a wake-up.
    """
    if not is_running(state):
        return IDLE_DELAY_S
    due = next_due(last_started, frequency_s, now)
    if state is ReplicationState.INITIAL_COPY and not_before is not None:
        due = max(due, not_before)
    return max(0.0, due - now)


def missed_slots(last_started: float | None, frequency_s: int, now: float) -> int:
    """How many due times since ``last_started`` can no longer start."""
    if last_started is None:
        return 0
    late = now - (last_started + frequency_s)
    return max(0, int(late // frequency_s))


def is_missed(due: float, frequency_s: int, now: float) -> bool:
    """A cycle not started within one period of its due time is missed."""
    return now >= due + frequency_s
