"""Replication relationships as pure rules, one module per concept.

Theory of operation: a *relationship* protects one VM. Its primary host takes a
point-in-time delta of every disk once per ``frequency_s`` (a *cycle*) and
streams it to the replica host, which verifies it, fsyncs it and links it into
a chain of *recovery points*: ``base <- p1 <- p2 <- ... <- latest`` where
``base`` is a full image and every later point a qcow2 overlay on the one
before. Nothing here does I/O; the replication service and its adapters
(QEMU, catalog, peer client) call these rules and do what they say.

- :mod:`.lifecycle`: the relationship's states and the transition table;
- :mod:`.schedule`: the allowed frequencies and when a cycle is due or missed;
- :mod:`.retention`: recovery point counts, the retention plan (:class:`Merge`)
  and continuous replication's thinning (:class:`Thin`);
- :mod:`.rpo`: the recovery point objective a relationship achieved;
- :mod:`.versions`: the functional-level rule between primary and replica;
- :mod:`.health`: cycle records, health and statistics;
- :mod:`.authority`: which peer may act on a relationship.

The delta stream between primary and replica is :mod:`ferry.core.delta_stream`;
the relationship as the catalogs store it, :mod:`ferry.core.relationship`.
Callers import the names below from ``ferry.core.replication``.
"""

from __future__ import annotations

from ferry.core.replication.authority import (
    ArrivedMove,
    Caller,
    ClusterHost,
    check_partner,
    check_primary_change,
    check_primary_or_cluster,
    check_takeover,
)
from ferry.core.replication.health import (
    BAD_CYCLE_SHARE,
    STALE_CRITICAL_S,
    STALE_WARNING_S,
    CycleKind,
    CycleRecord,
    CycleStatistics,
    Health,
    HealthReport,
    assess_health,
    health,
    latest_point_time,
    statistics,
)
from ferry.core.replication.lifecycle import (
    INITIAL_STATE,
    TRANSITIONS,
    ReplicationOp,
    ReplicationState,
    allowed,
    is_running,
    transition,
)
from ferry.core.replication.retention import (
    DEFAULT_RECOVERY_POINTS,
    MAX_RECOVERY_POINTS,
    Merge,
    PointInfo,
    Thin,
    check_recovery_points,
    retention_plan,
    thinning_plan,
)
from ferry.core.replication.rpo import RPO_WINDOW_S, Rpo, rpo
from ferry.core.replication.schedule import (
    DEFAULT_FREQUENCY,
    EXTENDED_FREQUENCIES,
    IDLE_DELAY_S,
    MAX_CONTINUOUS_VMS,
    Frequency,
    check_continuous_slot,
    check_extended_frequency,
    check_frequency,
    cycle_delay,
    default_extended_frequency,
    format_frequency,
    is_continuous,
    is_missed,
    missed_slots,
    next_due,
    parse_frequency,
)
from ferry.core.replication.versions import check_replica_accepts, check_reverse_allowed

__all__ = [
    "BAD_CYCLE_SHARE",
    "DEFAULT_FREQUENCY",
    "DEFAULT_RECOVERY_POINTS",
    "EXTENDED_FREQUENCIES",
    "IDLE_DELAY_S",
    "INITIAL_STATE",
    "MAX_CONTINUOUS_VMS",
    "MAX_RECOVERY_POINTS",
    "RPO_WINDOW_S",
    "STALE_CRITICAL_S",
    "STALE_WARNING_S",
    "TRANSITIONS",
    "ArrivedMove",
    "Caller",
    "ClusterHost",
    "CycleKind",
    "CycleRecord",
    "CycleStatistics",
    "Frequency",
    "Health",
    "HealthReport",
    "Merge",
    "PointInfo",
    "ReplicationOp",
    "ReplicationState",
    "Rpo",
    "Thin",
    "allowed",
    "assess_health",
    "check_continuous_slot",
    "check_extended_frequency",
    "check_frequency",
    "check_partner",
    "check_primary_change",
    "check_primary_or_cluster",
    "check_recovery_points",
    "check_replica_accepts",
    "check_reverse_allowed",
    "check_takeover",
    "cycle_delay",
    "default_extended_frequency",
    "format_frequency",
    "health",
    "is_continuous",
    "is_missed",
    "is_running",
    "latest_point_time",
    "missed_slots",
    "next_due",
    "parse_frequency",
    "retention_plan",
    "rpo",
    "statistics",
    "thinning_plan",
    "transition",
]
