"""``POST /v1/adoptions``: adopt a libvirt domain or an OVF appliance on this host.

The reply is the adoption job (202); its result carries ``notes``, what of the
source VM was not carried over (:mod:`ferry.host.adopt`).
"""

from __future__ import annotations

from aiohttp import web

from ferry.api.edge import json_reply, read_body
from ferry.api.models import AdoptRequest
from ferry.host.adopt import AdoptionService


class AdoptionRoutes:
    def __init__(self, adoption: AdoptionService) -> None:
        self.adoption = adoption

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/adoptions", self.adopt)]

    async def adopt(self, request: web.Request) -> web.Response:
        body = await read_body(request, AdoptRequest)
        job = await self.adoption.start(body.origin, body.path, name=body.name,
                                        network_map=body.network_map)  # fmt: skip
        return json_reply(job.view(self.adoption.config.name), status=202)
