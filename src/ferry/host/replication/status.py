"""``replication status`` of a relationship, as either of its hosts reports it.

The primary reports health and statistics from its cycle records
(:mod:`ferry.core.replication.health`, the CLI.md field names) and what waits
to be sent; the replica host reports its chain (:class:`ReplicaState`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ferry.core import replication as rules
from ferry.core.relationship import Relationship
from ferry.core.replication import CycleRecord
from ferry.peer.replication import ReplicaState


def primary_view(rel: Relationship, cycles: list[CycleRecord], now: float) -> dict[str, Any]:
    """The primary's status of ``rel``, its health judged from ``cycles``."""
    stats = rules.statistics(cycles, now)
    report = rules.assess_health(rel.state, cycles, now=now, frequency_s=rel.frequency_s,
                                 last_success=rules.latest_point_time(cycles),
                                 since=rel.created)  # fmt: skip
    achieved = rules.rpo(cycles, now)
    pending = sum(Path(f).stat().st_size for p in rel.pending for f in p.files
                  if Path(f).exists())  # fmt: skip
    return {
        "vm": rel.vm_name, "role": rel.role.value, "state": rel.state.value,
        "health": report.health.value, "health_reasons": list(report.reasons),
        "primary": rel.primary, "replica": rel.replica, "frequency_s": rel.frequency_s,
        "recovery_points": rel.recovery_points, "compression": rel.compression,
        "initial": rel.initial.value, "thumbprint": rel.thumbprint,
        "last_replication_time": stats["last_replication_time"], "lag_s": stats["lag_s"],
        "success_count": stats["success_count"], "miss_count": stats["miss_count"],
        "failure_count": stats["failure_count"],
        "network_failure_count": stats["network_failure_count"],
        "pending_bytes": pending, "pending_points": len(rel.pending),
        "app_consistent_every_s": rel.app_consistent_every_s,
        "app_consistent_count": rel.app_consistent_successes,
        "app_consistent_failure_count": rel.app_consistent_failures,
        "last_freeze_attempt": rel.last_freeze_attempt, "last_freeze_s": rel.last_freeze_s,
        "latest_point": rel.confirmed_point, "error": rel.error,
        "next_cycle": (rules.next_due(rel.last_started, rel.frequency_s, now)
                       if rules.is_running(rel.state) else None),
        "statistics": dict(stats),
        # The RPO achieved: now, and the p99 of its peaks over rpo_window_s.
        "rpo_s": achieved.rpo_s, "rpo_p99_s": achieved.rpo_p99_s,
        "rpo_window_s": rules.RPO_WINDOW_S,
    }  # fmt: skip


def replica_view(rel: Relationship, state: ReplicaState, now: float) -> dict[str, Any]:
    """The replica host's status of ``rel``, from its chain's ``state``."""
    latest = state.latest_time
    return {
        "vm": rel.vm_name, "role": rel.role.value,
        "state": rel.state.value,
        "health": "normal", "primary": rel.primary, "replica": rel.replica,
        "frequency_s": rel.frequency_s, "recovery_points": rel.recovery_points,
        "last_replication_time": latest, "lag_s": max(0.0, now - latest) if latest else None,
        "points": state.points, "latest_point": state.latest_point,
        "replica_bytes": state.bytes, "thumbprint": rel.thumbprint,
        "origin": rel.origin or None,
        # A clustered VM: which hosts may take the primary's place.
        "primary_cluster": ({"name": rel.cluster, "hosts": [h.name for h in rel.cluster_hosts]}
                            if rel.cluster else None),
    }  # fmt: skip
