"""``GET /v1/vms/{name}/vnc``: a VM's VNC display, relayed to an admin over a websocket.

QEMU serves the display on a unix socket in the host's runtime dir (never a
TCP port); this route joins that socket to the caller's websocket, binary
frames carrying the RFB bytes unchanged. The edge's guard lets only admin
certificates in (a host certificate reaches ``/v1/peer/...`` only). Each
websocket is one VNC connection; the VM's QEMU decides how many it takes.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ferry.errors import ConflictError, InvalidInputError
from ferry.host.vms.service import VmService
from ferry.peer.wsrelay import join_stream


class VncRoutes:
    def __init__(self, vms: VmService) -> None:
        self.vms = vms

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/vms/{name}/vnc", self.vnc)]

    async def vnc(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        record = self.vms.get(name)
        if record.spec.display != "vnc":
            raise InvalidInputError(
                f"VM {name!r} has no VNC display (a VM made with --display vnc has one)"
            )
        if self.vms.pid_of(record.uuid) is None:
            raise ConflictError(f"VM {name!r} is {record.state.value}: its display is there "
                                "only while its QEMU runs ('ferry vm start')")  # fmt: skip
        path = self.vms.processes.vnc_socket(record.uuid)
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError as exc:
            raise ConflictError(
                f"the VNC display of VM {name!r} does not answer: {exc.strerror or exc}"
            ) from exc
        ws = web.WebSocketResponse(max_msg_size=0, heartbeat=30)
        try:
            await ws.prepare(request)
        except BaseException:
            writer.close()
            raise
        await join_stream(reader, writer, ws)
        return ws
