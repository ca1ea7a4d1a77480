"""Routes of clustered VMs and node maintenance (admin certificate).

::

    POST   /v1/clusters/{c}/vms  ClusterVmRequest  -> VmView (201)  (on the VM's host)
    DELETE /v1/clusters/{c}/vms/{vm}               -> VmView        (on its owner)
    POST   /v1/clusters/{c}/drain   NodeRequest    -> job (202)     (on that node)
    POST   /v1/clusters/{c}/resume  NodeRequest    -> {cluster, node, draining}
    POST   /v1/clusters/{c}/upgrade-level          -> {cluster, functional_level, was}
    POST   /v1/clusters/{c}/copy-roles  CopyRolesRequest -> the report (on a node of c)

``vm create`` with ``cluster`` (``POST /v1/vms``) and the clustered side of
start, stop, kill, delete, move and show are in :mod:`ferry.api.server`.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from ferry.adapters.catalog import VmRecord
from ferry.api.edge import json_reply, read_body
from ferry.api.models import ClusterVmRequest, NodeRequest, VmView
from ferry.core.cluster.copy_roles import Step
from ferry.core.cluster.roles import parse_priority
from ferry.core.network import check_network_map
from ferry.host.cluster.copy_roles import CopyRoles
from ferry.host.cluster.maintenance import Maintenance
from ferry.host.cluster.vms import ClusterVms


class CopyRolesRequest(BaseModel):
    """``cluster copy-roles``: the source is the path's cluster."""

    model_config = ConfigDict(extra="forbid")
    to: str
    volume: str
    step: Step
    network_map: dict[str, str] = {}


class ClusterVmRoutes:
    def __init__(self, cluster_vms: ClusterVms, maintenance: Maintenance, *,
                 view: Callable[[VmRecord], VmView], host: str) -> None:  # fmt: skip
        self.cluster_vms = cluster_vms
        self.maintenance = maintenance
        self.view = view
        self.host = host
        self.copy = CopyRoles(cluster_vms)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/clusters/{cluster}/vms", self.add_vm),
            web.delete("/v1/clusters/{cluster}/vms/{vm}", self.remove_vm),
            web.post("/v1/clusters/{cluster}/drain", self.drain),
            web.post("/v1/clusters/{cluster}/resume", self.resume),
            web.post("/v1/clusters/{cluster}/upgrade-level", self.upgrade_level),
            web.post("/v1/clusters/{cluster}/copy-roles", self.copy_roles),
        ]

    async def add_vm(self, request: web.Request) -> web.Response:
        body = await read_body(request, ClusterVmRequest)
        record = await self.cluster_vms.add(request.match_info["cluster"], body.vm,
                                            priority=parse_priority(body.priority))  # fmt: skip
        return json_reply(self.view(record), status=201)

    async def remove_vm(self, request: web.Request) -> web.Response:
        record = await self.cluster_vms.remove(request.match_info["cluster"],
                                               request.match_info["vm"])  # fmt: skip
        return json_reply(self.view(record))

    async def drain(self, request: web.Request) -> web.Response:
        body = await read_body(request, NodeRequest)
        job = await self.maintenance.start_drain(request.match_info["cluster"], body.node)
        return json_reply(job.view(self.host), status=202)

    async def resume(self, request: web.Request) -> web.Response:
        body = await read_body(request, NodeRequest)
        return json_reply(await self.maintenance.resume(request.match_info["cluster"], body.node))

    async def upgrade_level(self, request: web.Request) -> web.Response:
        return json_reply(await self.maintenance.upgrade_level(request.match_info["cluster"]))

    async def copy_roles(self, request: web.Request) -> web.Response:
        body = await read_body(request, CopyRolesRequest)
        return json_reply(await self.copy.step(
            body.step, source=request.match_info["cluster"], target=body.to,
            volume=body.volume, network_map=check_network_map(body.network_map)))  # fmt: skip
