"""What the agent's state says at scrape time: VMs, jobs, replication, the cluster lease.

A :class:`StateCollector` reads the catalog and the services on each scrape
(nothing is cached, so a scrape is as true as ``ferry replication status``):
the primary's figures come from :func:`ferry.host.replication.status.primary_view`
(lag, health, pending bytes), the replica host's from its chain. States are
*state sets*: one series per possible value, 1 for the current one and 0 for
the others, so ``ferry_vm_state{state="crashed"} == 1`` finds a crashed VM and
an alert on a state never sees the series vanish.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ferry import __version__
from ferry.adapters.catalog import Catalog
from ferry.core.relationship import Relationship, Role
from ferry.core.replication import CycleRecord, Health, ReplicationState
from ferry.core.vmstate import VmState
from ferry.errors import FerryError
from ferry.host.jobs import Job
from ferry.host.replication.status import primary_view
from ferry.peer.replication import ReplicaState

log = logging.getLogger(__name__)

# assess_health's window (its default, as 'replication status' judges).
HEALTH_WINDOW_S = 3600.0


@dataclass(frozen=True)
class LeaseView:
    """This node's lease in its cluster, as the lease keeper holds it."""

    cluster: str
    held: bool


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _state_set(family: GaugeMetricFamily, prefix: list[str], current: str,
               values: Iterable[str]) -> None:  # fmt: skip
    for value in values:
        family.add_metric([*prefix, value], 1.0 if value == current else 0.0)


class StateCollector(Collector):
    """Current-state gauges of one agent (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str,
        catalog: Catalog,
        jobs: Callable[[], Iterable[Job]],
        replica_state: Callable[[str], ReplicaState],
        lease: Callable[[], LeaseView | None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.catalog = catalog
        self.jobs = jobs
        self.replica_state = replica_state
        self.lease = lease
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        info = _gauge("ferry_agent_info", "The agent: its host name and ferry version (always 1).",
                      ["host", "version"])  # fmt: skip
        info.add_metric([self.host, __version__], 1.0)
        yield info
        yield from self._vms()
        yield self._jobs()
        yield from self._replication()
        yield from self._lease()

    def _vms(self) -> Iterator[Metric]:
        records = self.catalog.vms()
        counts = Counter(r.state.value for r in records)
        total = _gauge("ferry_vms", "VMs on this host (replica VMs included), by state.",
                       ["state"])  # fmt: skip
        for state in VmState:
            total.add_metric([state.value], float(counts.get(state.value, 0)))
        yield total
        per_vm = _gauge("ferry_vm_state", "Each VM's state: 1 for its current state, 0 for "
                        "the others.", ["vm", "state"])  # fmt: skip
        for record in records:
            _state_set(per_vm, [record.name], record.state.value, (s.value for s in VmState))
        yield per_vm

    def _jobs(self) -> Metric:
        counts = Counter((job.kind, job.state) for job in self.jobs())
        family = _gauge("ferry_jobs", "Jobs this host knows of (its catalog keeps finished "
                        "ones), by kind and state.", ["kind", "state"])  # fmt: skip
        for (kind, state), count in sorted(counts.items()):
            family.add_metric([kind, state], float(count))
        return family

    def _replication(self) -> Iterator[Metric]:
        now = self.clock()
        lag = _gauge("ferry_replication_lag_seconds", "Age of the content of the latest "
                     "recovery point: now minus its point in time (what a failover now would "
                     "lose).", ["vm", "role"])  # fmt: skip
        objective = _gauge("ferry_replication_rpo_objective_seconds", "The recovery point "
                           "objective: the replication frequency.", ["vm", "role"])  # fmt: skip
        rpo = _gauge("ferry_replication_rpo_seconds", "The RPO achieved now: what a failover "
                     "now would lose (primary side; 'replication status' rpo_s).",
                     ["vm"])  # fmt: skip
        rpo_p99 = _gauge("ferry_replication_rpo_p99_seconds", "The 99th percentile of the "
                         "RPO's peaks over the status window (rpo_p99_s).", ["vm"])  # fmt: skip
        health = _gauge("ferry_replication_health", "Replication health as 'replication "
                        "status' judges it (primary side): 1 for the current value.",
                        ["vm", "health"])  # fmt: skip
        state = _gauge("ferry_replication_state", "The relationship's state: 1 for the current "
                       "one.", ["vm", "role", "state"])  # fmt: skip
        pending = _gauge("ferry_replication_pending_bytes", "Bytes of recovery points cut "
                         "but not yet linked on the replica (primary side).", ["vm"])  # fmt: skip
        points = _gauge("ferry_replication_recovery_points", "Recovery points the replica "
                        "holds (replica side).", ["vm"])  # fmt: skip
        kept = _gauge("ferry_replication_recovery_points_limit", "How many recovery points "
                      "the relationship keeps.", ["vm", "role"])  # fmt: skip
        stored = _gauge("ferry_replication_replica_bytes", "Bytes of the replica's chain "
                        "(replica side).", ["vm"])  # fmt: skip
        for rel in self.catalog.relationships():
            try:
                self._relationship(rel, now, lag=lag, rpo=(rpo, rpo_p99), health=health,
                                   sizes=(pending, points, stored))  # fmt: skip
            except (FerryError, OSError) as exc:  # one VM's trouble does not fail the scrape
                log.warning("metrics: VM %s: %s", rel.vm_name, exc)
                continue
            role = rel.role.value
            objective.add_metric([rel.vm_name, role], float(rel.frequency_s))
            kept.add_metric([rel.vm_name, role], float(rel.recovery_points))
            _state_set(state, [rel.vm_name, role], rel.state.value,
                       (s.value for s in ReplicationState))  # fmt: skip
        yield from (lag, objective, rpo, rpo_p99, health, state, pending, points, kept, stored)

    def _relationship(self, rel: Relationship, now: float, *, lag: GaugeMetricFamily,
                      rpo: tuple[GaugeMetricFamily, GaugeMetricFamily],
                      health: GaugeMetricFamily,
                      sizes: tuple[GaugeMetricFamily, ...]) -> None:  # fmt: skip
        """One relationship's lag, RPO, health and sizes (pending, points, replica bytes)."""
        pending, points, stored = sizes
        vm, role = rel.vm_name, rel.role.value
        if rel.role is Role.PRIMARY:
            view = primary_view(rel, self._recent_cycles(rel, now), now)
            if view["lag_s"] is not None:
                lag.add_metric([vm, role], float(view["lag_s"]))
            # rpo_s (the RPO achieved now) is the lag by its definition; older status lacks it.
            for family, key in zip(rpo, ("rpo_s", "rpo_p99_s"), strict=True):
                value = view.get(key, view["lag_s"] if key == "rpo_s" else None)
                if value is not None:
                    family.add_metric([vm], float(value))
            _state_set(health, [vm], view["health"], (h.value for h in Health))
            pending.add_metric([vm], float(view["pending_bytes"]))
            return
        replica = self.replica_state(rel.vm_uuid)
        if replica.latest_time is not None:
            lag.add_metric([vm, role], max(0.0, now - replica.latest_time))
        points.add_metric([vm], float(replica.points))
        stored.add_metric([vm], float(replica.bytes))

    def _recent_cycles(self, rel: Relationship, now: float) -> list[CycleRecord]:
        """The cycles the gauges depend on: the health window's (and the RPO's, shorter).

        A scrape reads this hour's cycles, not the day the catalog keeps (2,880
        rows a VM at 30 s, 17,280 at 5 s); lag, health and RPO come out the same
        as from all of them while a recovery point was made in it. Without one,
        all are read: the lag and the staleness rule need the latest success.
        """
        since = now - HEALTH_WINDOW_S - rel.frequency_s
        recent = self.catalog.cycles(rel.vm_uuid, since=since)
        if any(c.ok for c in recent):
            return recent
        return self.catalog.cycles(rel.vm_uuid)

    def _lease(self) -> Iterator[Metric]:
        lease = self.lease()
        held = _gauge("ferry_cluster_lease_held", "Whether this node holds its cluster lease "
                      "(renewed in time, not fenced): 1 or 0. Absent outside a cluster.",
                      ["cluster"])  # fmt: skip
        if lease is not None:
            held.add_metric([lease.cluster], 1.0 if lease.held else 0.0)
        yield held
