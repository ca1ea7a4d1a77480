"""Routes of a cluster as a replica target, the replica broker (admin certificate).

::

    GET    /v1/clusters/{c}/replica-server                        -> the cluster's settings
    PUT    /v1/clusters/{c}/replica-server  BrokerSettingsRequest -> the settings kept
    DELETE /v1/clusters/{c}/replica-server                        -> the settings, disabled

Any node of ``c`` answers; the settings live once, in the cluster's store
(:mod:`ferry.host.replication.broker`).
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ferry.api.edge import json_reply, read_body
from ferry.host.replication.broker import ReplicaBroker


class BrokerAllow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str
    trust_group: str | None = None


class BrokerSettingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    volume: str
    allow: list[BrokerAllow] = Field(default_factory=list, max_length=256)
    allow_any: bool = False


class ReplicaBrokerRoutes:
    def __init__(self, broker: ReplicaBroker) -> None:
        self.broker = broker

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/clusters/{cluster}/replica-server", self.show),
            web.put("/v1/clusters/{cluster}/replica-server", self.configure),
            web.delete("/v1/clusters/{cluster}/replica-server", self.disable),
        ]

    async def show(self, request: web.Request) -> web.Response:
        return json_reply(await self.broker.show(request.match_info["cluster"]))

    async def configure(self, request: web.Request) -> web.Response:
        body = await read_body(request, BrokerSettingsRequest)
        return json_reply(await self.broker.configure(
            request.match_info["cluster"], volume=body.volume,
            allow=[a.model_dump() for a in body.allow], allow_any=body.allow_any))  # fmt: skip

    async def disable(self, request: web.Request) -> web.Response:
        return json_reply(await self.broker.disable(request.match_info["cluster"]))
