"""Counters and histograms that services bump where things happen.

Services hold a :class:`MetricEvents` (the default one does nothing, so a
service built without an agent, as in unit tests, needs no registry); the
agent gives them its :class:`MetricsRecorder`. Each event is one call at the
spot where it happens: the end of a replication cycle (the primary's
scheduler), a job's change of state (:class:`~ferry.host.jobs.JobRegistry`,
which is how the end of a move is seen without touching the move's phases),
and a lease renewal or a fence (the cluster's lease keeper).

Labels stay bounded: VM names, results, causes, job kinds and cluster names;
never job ids.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from ferry.core import replication as rules
from ferry.core.relationship import Relationship
from ferry.core.replication import CycleKind, ReplicationState

# Replication cycles take from well under a second (a small delta) to hours (an initial copy).
CYCLE_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0)
# Delta sizes: 64 KiB to 64 GiB, by factors of 4.
CYCLE_BYTES = tuple(float(64 * 1024 * 4**i) for i in range(11))
MOVE_SECONDS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
DOWNTIME_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MOVE_BYTES = tuple(float(16 * 1024**2 * 4**i) for i in range(10))  # 16 MiB to 4 TiB

# What ended a replication cycle badly, as the ``cause`` label says it.
CAUSE_OF_KIND = {
    CycleKind.NETWORK_FAILURE: "network",
    CycleKind.FAILURE: "error",
}
# The final states of a move job (core/migration.py phases), as the ``result`` label says them.
MOVE_RESULTS = {"done": "ok", "failed": "failed", "cancelled": "cancelled"}
MOVE_KIND = "move"  # ferry.host.migration.attempt.MOVE (not imported: no cycle)
S = ReplicationState


class MetricEvents:
    """The events services report; this base records nothing."""

    def replication_cycle(self, before: Relationship | None, after: Relationship | None,
                          outcome: dict[str, Any]) -> None:  # fmt: skip
        """A replication cycle ended with ``outcome`` (``timed_cycle``'s dict).

        ``before`` and ``after`` are the relationship around the cycle: the
        slots it recorded as missed and whether it stopped replication
        (``error``) follow from them.
        """

    def job_changed(self, kind: str, state: str, detail: dict[str, Any],
                    elapsed_s: float) -> None:  # fmt: skip
        """A job of ``kind`` entered ``state``; ``elapsed_s`` since it was created."""

    def lease_renewal(self, cluster: str, *, ok: bool) -> None:
        """One attempt to renew this node's lease in ``cluster``."""

    def fenced(self, cluster: str) -> None:
        """This node fenced itself in ``cluster`` (its clustered QEMUs killed)."""


NO_METRICS = MetricEvents()


class MetricsRecorder(MetricEvents):
    """The agent's event metrics, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.cycles = Counter(
            "ferry_replication_cycles", "Replication cycles this host ran as the primary, by "
            "result (ok, or the failure's cause).", ["vm", "result"], registry=r)  # fmt: skip
        self.failures = Counter(
            "ferry_replication_failures", "Replication cycles that did not produce a recovery "
            "point, by cause: network (the replica was unreachable), error, stopped (the "
            "relationship went to error), missed (a slot passed without a cycle).",
            ["vm", "cause"], registry=r)  # fmt: skip
        self.cycle_seconds = Histogram(
            "ferry_replication_cycle_duration_seconds", "Duration of successful replication "
            "cycles.", ["vm"], buckets=CYCLE_SECONDS, registry=r)  # fmt: skip
        self.cycle_bytes = Histogram(
            "ferry_replication_cycle_bytes", "Bytes sent by successful replication cycles.",
            ["vm"], buckets=CYCLE_BYTES, registry=r)  # fmt: skip
        self.moves = Counter(
            "ferry_migrations", "Live migrations (moves) this host started that ended, by "
            "result: ok, failed, cancelled.", ["result"], registry=r)  # fmt: skip
        self.move_seconds = Histogram(
            "ferry_migration_duration_seconds", "Wall time of moves that ended, from the "
            "request to the end.", ["result"], buckets=MOVE_SECONDS, registry=r)  # fmt: skip
        self.move_downtime = Histogram(
            "ferry_migration_downtime_seconds", "The guest's downtime of successful moves, as "
            "the move job reports it (downtime_ms).", buckets=DOWNTIME_SECONDS,
            registry=r)  # fmt: skip
        self.move_bytes = Histogram(
            "ferry_migration_bytes", "Bytes a successful move copied (memory and disks).",
            buckets=MOVE_BYTES, registry=r)  # fmt: skip
        self.job_ends = Counter(
            "ferry_job_ends", "Jobs that reached a final state since the agent started, by "
            "kind and state.", ["kind", "state"], registry=r)  # fmt: skip
        self.renewals = Counter(
            "ferry_cluster_lease_renewals", "Attempts to renew this node's cluster lease, by "
            "result (ok, failed).", ["cluster", "result"], registry=r)  # fmt: skip
        self.fences = Counter(
            "ferry_cluster_fences", "Times this node fenced itself (killed its clustered "
            "QEMUs) because its lease could not be renewed.", ["cluster"],
            registry=r)  # fmt: skip

    def replication_cycle(self, before: Relationship | None, after: Relationship | None,
                          outcome: dict[str, Any]) -> None:  # fmt: skip
        if before is None or after is None:
            return
        vm = after.vm_name
        missed = 0
        if after.last_started is not None and after.last_started != before.last_started:
            # The cycle ran from after.last_started on, and first recorded these misses.
            missed = rules.missed_slots(before.last_started, before.frequency_s,
                                        after.last_started)  # fmt: skip
        stopped = after.state is S.ERROR and before.state is not S.ERROR
        if missed:
            self.failures.labels(vm=vm, cause="missed").inc(missed)
        result = outcome.get("result")
        if result == "ok":
            self.cycles.labels(vm=vm, result="ok").inc()
            self.cycle_seconds.labels(vm=vm).observe(float(outcome.get("duration_s") or 0.0))
            self.cycle_bytes.labels(vm=vm).observe(float(outcome.get("bytes") or 0))
        elif result in CAUSE_OF_KIND:
            cause = "stopped" if stopped else CAUSE_OF_KIND[CycleKind(result)]
            self.cycles.labels(vm=vm, result=cause).inc()
            self.failures.labels(vm=vm, cause=cause).inc()

    def job_changed(self, kind: str, state: str, detail: dict[str, Any],
                    elapsed_s: float) -> None:  # fmt: skip
        if state not in MOVE_RESULTS:
            return
        self.job_ends.labels(kind=kind, state=state).inc()
        if kind != MOVE_KIND:
            return
        result = MOVE_RESULTS[state]
        self.moves.labels(result=result).inc()
        summary = detail.get("result") or {}
        total = summary.get("total_s", elapsed_s) if isinstance(summary, dict) else elapsed_s
        self.move_seconds.labels(result=result).observe(max(0.0, float(total)))
        if result != "ok" or not isinstance(summary, dict):
            return
        downtime_ms = summary.get("downtime_ms")
        if isinstance(downtime_ms, int | float):
            self.move_downtime.observe(downtime_ms / 1000)
        progress = detail.get("progress") or {}
        copied = sum(int(progress.get(key) or 0) for key in ("ram_bytes", "disk_bytes"))
        if copied:
            self.move_bytes.observe(copied)

    def lease_renewal(self, cluster: str, *, ok: bool) -> None:
        self.renewals.labels(cluster=cluster, result="ok" if ok else "failed").inc()

    def fenced(self, cluster: str) -> None:
        self.fences.labels(cluster=cluster).inc()
