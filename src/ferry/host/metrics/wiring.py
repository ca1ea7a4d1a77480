"""One agent's metrics, wired: the registry, its collectors, and the services that report.

:func:`agent_metrics` is what the agent calls once its services exist; it
gives each reporting service the recorder (their default records nothing)
and registers the scrape-time collectors, so the composition root stays one
call.
"""

from __future__ import annotations

from prometheus_client import ProcessCollector

from ferry.adapters.catalog import Catalog
from ferry.host.cluster.fencing import NodeFencing
from ferry.host.jobs import JobRegistry
from ferry.host.metrics.collector import LeaseView, StateCollector
from ferry.host.metrics.recorder import MetricsRecorder
from ferry.host.replication.primary import ReplicationService


def lease_view(fencing: NodeFencing) -> LeaseView | None:
    """This node's lease as ``fencing`` keeps it (None outside a cluster)."""
    keeper = fencing.keeper
    if keeper is None:
        return None
    return LeaseView(cluster=keeper.membership.cluster, held=keeper.holds_lease())


def agent_metrics(*, host: str, catalog: Catalog, jobs: JobRegistry,
                  replication: ReplicationService,
                  fencing: NodeFencing | None = None) -> MetricsRecorder:  # fmt: skip
    """A fresh registry for one agent (never the process-wide default)."""
    metrics = MetricsRecorder()
    metrics.registry.register(StateCollector(
        host=host, catalog=catalog, jobs=jobs.all, replica_state=replication.store.state,
        lease=(lambda: lease_view(fencing)) if fencing is not None else lambda: None))  # fmt: skip
    # The agent's own RSS, CPU and open files (process_*), for soak runs and leaks.
    ProcessCollector(registry=metrics.registry)
    jobs.metrics = metrics
    replication.metrics = metrics
    if fencing is not None:
        fencing.metrics = metrics
    return metrics
