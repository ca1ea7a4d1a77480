"""Admin routes of cluster membership: this host's cluster, show, events, volumes.

Wire format (JSON, admin certificate)::

    GET  /v1/cluster                         -> {"name","node","etcd","etcd_tls","connected",
                                                 "leader"} | null
    POST /v1/cluster/create  JoinRequest     -> {"name","node","etcd","lease",
                                                 "functional_level"} (201)
    POST /v1/cluster/join    JoinRequest     -> the same (201)
    POST /v1/cluster/leave   LeaveRequest    -> {"name","node","left": true}
    GET  /v1/clusters/{c}                    -> {"name","etcd","leader","functional_level",
                                                 "nodes":[{"name","url","state",
                                                 "functional_level","version",
                                                 "memory_free","vms"}],
                                                 "volumes":[{"name","path"}]}
    GET  /v1/clusters/{c}/events             -> [{"at","kind","node","vm","reason"}]
    POST /v1/clusters/{c}/volumes  ClusterVolumeRequest -> {"name","path"} (201)

``etcd_tls`` is a directory on the host with ``ca-cert.pem client-cert.pem
client-key.pem``; null means the host's own TLS dir for ``https://``
endpoints (none for ``http://``). A host that is in another cluster, or in
none, answers ``/v1/clusters/{c}...`` with not-found naming what it is in.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from ferry.api.edge import json_reply as _json
from ferry.api.edge import read_body as _body
from ferry.host.cluster.service import ClusterService
from ferry.host.cluster.volumes import VolumeService


class JoinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    etcd: list[str]
    etcd_tls: str | None = None


class LeaveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class ClusterVolumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str


class ClusterRoutes:
    """Route handlers for this host's cluster membership."""

    def __init__(self, clusters: ClusterService, volumes: VolumeService) -> None:
        self.clusters = clusters
        self.volumes = volumes

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/cluster", self.info),
            web.post("/v1/cluster/create", self.create),
            web.post("/v1/cluster/join", self.join),
            web.post("/v1/cluster/leave", self.leave),
            web.get("/v1/clusters/{c}", self.show),
            web.get("/v1/clusters/{c}/events", self.events),
            web.post("/v1/clusters/{c}/volumes", self.add_volume),
        ]

    async def info(self, request: web.Request) -> web.Response:
        info = self.clusters.info()
        return web.Response(text="null", content_type="application/json") if info is None \
            else _json(info)  # fmt: skip

    async def create(self, request: web.Request) -> web.Response:
        body = await _body(request, JoinRequest)
        return _json(await self.clusters.create(body.name, body.etcd, body.etcd_tls), status=201)

    async def join(self, request: web.Request) -> web.Response:
        body = await _body(request, JoinRequest)
        return _json(await self.clusters.join(body.name, body.etcd, body.etcd_tls), status=201)

    async def leave(self, request: web.Request) -> web.Response:
        body = await _body(request, LeaveRequest)
        return _json(await self.clusters.leave(body.name))

    async def show(self, request: web.Request) -> web.Response:
        return _json(await self.clusters.show(request.match_info["c"]))

    async def events(self, request: web.Request) -> web.Response:
        return _json(await self.clusters.events(request.match_info["c"]))

    async def add_volume(self, request: web.Request) -> web.Response:
        body = await _body(request, ClusterVolumeRequest)
        m = self.clusters.member_of(request.match_info["c"])
        record = await self.volumes.add(m, body.name, body.path)
        return _json({"name": record.name, "path": record.path}, status=201)
