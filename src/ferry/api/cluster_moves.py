"""``POST /v1/vms/{name}/move`` with ``to_cluster``: a live move into another cluster.

Body (:class:`ferry.api.models.MoveRequest`): ``{"to_cluster": "c2", "volume": "csv1"
| null, "to": "host-3" | "", "max_bandwidth", "downtime_limit_ms", "network_map"}``;
the answer is the move's job (202), as for any move; its result adds ``cluster``,
``from_cluster``, ``unprotected_s`` and ``handover_revision``. Asked of the VM's owner
(the CLI finds it); every check against the target cluster is made before the job
exists (:mod:`ferry.host.cluster.crossing`).
"""

from __future__ import annotations

from ferry.api.models import MoveRequest
from ferry.core.network import check_network_map
from ferry.errors import InvalidInputError
from ferry.host.cluster.crossing import ClusterCrossing
from ferry.host.jobs import Job
from ferry.host.migration.service import MigrationService


async def move_to_cluster(crossing: ClusterCrossing | None, migrations: MigrationService,
                          name: str, move: MoveRequest) -> Job:  # fmt: skip
    """Plan, pre-flight (the destination's CPU models and networks) and start the move."""
    if move.to_cluster is None:
        raise InvalidInputError("a move needs --to HOST, or --to-cluster CLUSTER")
    if crossing is None:
        raise InvalidInputError("this agent cannot move VMs between clusters")
    if move.storage == "shared":
        raise InvalidInputError("--to-cluster picks the storage itself: shared when the "
                                "target cluster sees the VM's volume, else a copy")  # fmt: skip
    network_map = check_network_map(move.network_map)
    plan = await crossing.plan(name, target=move.to_cluster, volume=move.volume,
                               to=move.to or None, network_map=network_map)  # fmt: skip
    await migrations.preflight(name, to=plan.node, to_url=plan.url, network_map=network_map)
    job = migrations.start_move(name, to=plan.node, to_url=plan.url, storage=plan.storage,
                                max_bandwidth=move.max_bandwidth,
                                downtime_limit_ms=move.downtime_limit_ms,
                                network_map=network_map)  # fmt: skip
    crossing.started(job.id, plan)
    return job
