"""The planner's routes: a host's inventory, a VM's dirty rate, a bandwidth probe to a peer.

Admin certificate only (the edge's guard). Payloads are in
:mod:`ferry.api.models`; the work is :class:`ferry.host.inventory.InventoryService`.
"""

from __future__ import annotations

from aiohttp import web

from ferry.api.edge import json_reply, read_body
from ferry.core.plan.agent_facts import ProbeRequest
from ferry.errors import InvalidInputError
from ferry.host.inventory import InventoryService


class InventoryRoutes:
    def __init__(self, inventory: InventoryService) -> None:
        self.inventory = inventory

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/host/inventory", self.host_inventory),
            web.get("/v1/vms/{name}/dirty-rate", self.dirty_rate),
            web.post("/v1/host/bandwidth-probe", self.probe),
        ]

    async def host_inventory(self, request: web.Request) -> web.Response:
        return json_reply(await self.inventory.inventory())

    async def dirty_rate(self, request: web.Request) -> web.Response:
        raw = request.query.get("seconds", "1")
        if raw not in ("1", "2"):
            raise InvalidInputError(f"seconds must be 1 or 2, not {raw!r}")
        view = await self.inventory.dirty_rate(request.match_info["name"], int(raw))
        return json_reply(view)

    async def probe(self, request: web.Request) -> web.Response:
        body = await read_body(request, ProbeRequest)
        return json_reply(await self.inventory.probe(body))
