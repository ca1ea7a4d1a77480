"""A VM's graphical console for an admin: its VNC display through the agent's websocket.

:class:`VncForward` is ``ferry vm vnc``'s local port: each TCP connection to
it (a VNC viewer) is joined to ``GET /v1/vms/{name}/vnc`` on whichever host
has the VM then, with the admin certificate, so a viewer that reconnects
after a move finds the VM where it went. :func:`relay_to_browser` is the web
console's: the browser's websocket joined to the same route.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from urllib.parse import quote

from ferry.client.fleet import Fleet
from ferry.errors import FerryError, InvalidInputError
from ferry.peer.wsrelay import WebSocket, join_stream, join_websockets

log = logging.getLogger(__name__)


def vnc_path(vm: str) -> str:
    return f"/v1/vms/{quote(vm, safe='')}/vnc"


async def check_display(fleet: Fleet, vm: str, host: str | None) -> str:
    """The host that has VM ``vm``, refused in one line when it has no VNC display."""
    where, view = await fleet.locate(vm, host)
    if not view.get("vnc"):
        raise InvalidInputError(f"VM {vm!r} has no VNC display (create it with --display vnc)")
    return where


async def relay_to_browser(fleet: Fleet, vm: str, host: str | None, browser: WebSocket) -> None:
    """Join ``browser`` to the VM's display until either side closes."""
    where = await check_display(fleet, vm, host)
    async with fleet.client(where).websocket(vnc_path(vm)) as agent:
        await join_websockets(browser, agent)


class VncForward:
    """A loopback TCP listener whose connections reach VM ``vm``'s VNC display."""

    def __init__(self, fleet: Fleet, vm: str, host: str | None,
                 on_error: Callable[[str], None] = log.warning) -> None:  # fmt: skip
        self.fleet = fleet
        self.vm = vm
        self.host = host
        self.on_error = on_error
        self._server: asyncio.Server | None = None

    async def start(self, address: str, port: int) -> int:
        """Listen on ``address:port``; the port it listens on (0 picks a free one)."""
        try:
            self._server = await asyncio.start_server(self._connection, address, port)
        except OSError as exc:  # busy port, address not of this machine, unknown name
            # asyncio rewords bind errors ("error while attempting to bind ..."): the
            # errno's own words say it shortest.
            code = exc.errno or 0  # getaddrinfo's are negative: their strerror says it
            reason = os.strerror(code) if code > 0 else exc.strerror or str(exc)
            raise InvalidInputError(
                f"--listen {address}:{port}: {reason}; pick another "
                "address or port (port 0 picks a free one)"
            ) from None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:  # fmt: skip
        try:
            where = await check_display(self.fleet, self.vm, self.host)
            async with self.fleet.client(where).websocket(vnc_path(self.vm)) as ws:
                await join_stream(reader, writer, ws)
        except FerryError as exc:
            self.on_error(str(exc))
        finally:
            writer.close()
