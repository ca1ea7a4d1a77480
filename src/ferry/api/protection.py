"""Admin routes that protect VMs: the replica server, replication, extension, failover.

Each handler reads its body model, calls one host service and answers with
its view; the services decide everything. Mounted by
:class:`ferry.api.server.AgentApi`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ferry.api.edge import json_reply as _json
from ferry.api.edge import read_body as _body
from ferry.api.models import (
    EnableReplicationRequest,
    ExtendReplicationRequest,
    FailoverRequest,
    ImportInitialRequest,
    SetReplicationRequest,
)
from ferry.core.network import check_network_map
from ferry.core.relationship import InitialMethod
from ferry.core.relationship import Role as RelRole
from ferry.core.replica_server import ReplicaServerSettings
from ferry.errors import InvalidInputError
from ferry.host.failover.service import FailoverService
from ferry.host.jobs import Job
from ferry.host.replication.extension import ExtensionService
from ferry.host.replication.primary import ReplicationService
from ferry.host.vms.service import VmService


class ProtectionRoutes:
    """Route handlers for replication and failover on one host."""

    def __init__(self, vms: VmService, replication: ReplicationService,
                 extensions: ExtensionService, failover: FailoverService) -> None:  # fmt: skip
        self.vms = vms
        self.replication = replication
        self.extensions = extensions
        self.failover = failover
        self.replicas = replication.store
        self.replica_server = replication.store.server

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/replica-server", self.replica_settings),
            web.put("/v1/replica-server", self.configure_replica_server),
            web.delete("/v1/replica-server", self.disable_replica_server),
            web.post("/v1/vms/{name}/replication", self.enable_replication),
            web.get("/v1/vms/{name}/replication", self.replication_status),
            web.patch("/v1/vms/{name}/replication", self.set_replication),
            web.post("/v1/vms/{name}/replication/pause", self.pause_replication),
            web.post("/v1/vms/{name}/replication/resume", self.resume_replication),
            web.post("/v1/vms/{name}/replication/sync", self.sync_replication),
            web.delete("/v1/vms/{name}/replication", self.remove_replication),
            web.get("/v1/vms/{name}/replication/points", self.replication_points),
            web.post("/v1/replication/import-initial", self.import_initial),
            web.post("/v1/vms/{name}/replication/reverse", self.reverse_replication),
            web.post("/v1/vms/{name}/replication/extend", self.extend_replication),
            web.delete("/v1/vms/{name}/replication/extend", self.remove_extension),
            web.post("/v1/vms/{name}/failover/{action}", self.failover_action),
        ]

    async def replica_settings(self, request: web.Request) -> web.Response:
        return _json(self.replica_server.settings())

    async def configure_replica_server(self, request: web.Request) -> web.Response:
        settings = await _body(request, ReplicaServerSettings)
        return _json(self.replica_server.configure(settings))

    async def disable_replica_server(self, request: web.Request) -> web.Response:
        return _json(self.replica_server.disable())

    # -- replication (admin) ---------------------------------------------------------

    async def enable_replication(self, request: web.Request) -> web.Response:
        body = await _body(request, EnableReplicationRequest)
        status = await self.replication.enable(
            request.match_info["name"], replica=body.replica, replica_url=body.replica_url,
            frequency_s=body.frequency_s, recovery_points=body.recovery_points,
            initial=InitialMethod(body.initial), media_dir=body.media_dir,
            compression=body.compression, initial_after=body.initial_after,
            network_map=check_network_map(body.network_map),
            app_consistent_every_s=body.app_consistent_every_s)  # fmt: skip
        return _json(status, status=201)

    async def replication_status(self, request: web.Request) -> web.Response:
        status = self.replication.status(request.match_info["name"])
        if status["role"] == "replica":
            status["extended"] = self.extensions.view(self.vms.get(status["vm"]).uuid)
        return _json(status)

    async def extend_replication(self, request: web.Request) -> web.Response:
        body = await _body(request, ExtendReplicationRequest)
        view = await self.extensions.extend(
            request.match_info["name"], to=body.to, url=body.to_url,
            frequency_s=body.frequency_s, recovery_points=body.recovery_points)  # fmt: skip
        return _json(view, status=201)

    async def remove_extension(self, request: web.Request) -> web.Response:
        return _json(await self.extensions.remove(request.match_info["name"]))

    async def set_replication(self, request: web.Request) -> web.Response:
        body = await _body(request, SetReplicationRequest)
        status = await self.replication.change(
            request.match_info["name"], replica=body.replica, replica_url=body.replica_url,
            frequency_s=body.frequency_s, recovery_points=body.recovery_points,
            thumbprint=body.certificate_thumbprint,
            network_map=None if body.network_map is None else check_network_map(body.network_map),
            app_consistent_every_s=body.app_consistent_every_s,
        )  # fmt: skip
        return _json(status)

    async def pause_replication(self, request: web.Request) -> web.Response:
        return _json(await self.replication.pause(request.match_info["name"]))

    async def resume_replication(self, request: web.Request) -> web.Response:
        return _json(await self.replication.pause(request.match_info["name"], resume=True))

    async def sync_replication(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        record = self.vms.get(name)
        rel = self.vms.catalog.relationship(record.uuid)
        if rel is not None and rel.role is RelRole.REPLICA:  # on the replica: the extension
            return _json(await self.extensions.sync_now(name))
        return _json(await self.replication.sync_now(name))

    async def remove_replication(self, request: web.Request) -> web.Response:
        return _json(await self.replication.remove(request.match_info["name"]))

    async def replication_points(self, request: web.Request) -> web.Response:
        return _json(await self.replication.points(request.match_info["name"]))

    async def import_initial(self, request: web.Request) -> web.Response:
        body = await _body(request, ImportInitialRequest)
        return _json(await self.replicas.import_initial(Path(body.folder)))

    # -- failover ----------------------------------------------------------------------

    async def failover_action(self, request: web.Request) -> web.Response:
        """Every failover operation runs as a job (202); ``ferry job show`` follows it."""
        name, action = request.match_info["name"], request.match_info["action"]
        body = await _body(request, FailoverRequest)
        failover = self.failover
        operations: dict[str, Callable[[Job], Awaitable[dict[str, Any]]]] = {
            "test": lambda job: failover.test(
                name, body.point, job, test_network=body.test_network
            ),
            "stop-test": lambda job: failover.stop_test(name, job),
            "start": lambda job: failover.start(name, body.point, force=body.force, job=job),
            "complete": lambda job: failover.complete(name, job),
            "cancel": lambda job: failover.cancel(name, job),
        }
        if body.test_network is not None and action != "test":
            raise InvalidInputError("--test-network is for 'failover test' only")
        if action == "test":
            await failover.check_test_network(body.test_network)
        if action == "planned":
            job = failover.start_planned(name)
        elif action in operations:
            job = failover.run_job(action, name, operations[action])
        else:
            raise InvalidInputError(f"unknown failover action {action!r}")
        return _json(job.view(self.vms.config.name), status=202)

    async def reverse_replication(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        job = self.failover.run_job("reverse", name, lambda job: self.failover.reverse(name, job))
        return _json(job.view(self.vms.config.name), status=202)
