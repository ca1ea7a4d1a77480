"""``GET /v1/host/doctor``: this host's ``ferry doctor`` checks (admin certificate only).

The reply is ``{"host", "received", "time", "checks": [{"name", "status",
"detail", "remedy", "host"}]}``; ``received`` and ``time`` are the agent's
Unix times when the request came and when the answer left, which the client
compares across hosts for the clock check. The work is :class:`ferry.host.doctor.HostDoctor`.
"""

from __future__ import annotations

from aiohttp import web

from ferry.api.edge import json_reply
from ferry.host.doctor import HostDoctor


class DoctorRoutes:
    def __init__(self, doctor: HostDoctor) -> None:
        self.doctor = doctor

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/host/doctor", self.report)]

    async def report(self, request: web.Request) -> web.Response:
        return json_reply(await self.doctor.report())
