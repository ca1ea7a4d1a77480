"""``/vms/NAME/vnc``: the browser's websocket to a VM's graphical console.

The session cookie was checked by the security edge (app.py) like every
page's; a websocket upgrade is a GET, so the Origin check that guards unsafe
methods is made here too: only this console's own pages may open it. The
socket is then joined, through :func:`ferry.client.vnc.relay_to_browser`
(the same route ``ferry vm vnc`` uses, with the admin certificate), to the
agent's ``GET /v1/vms/NAME/vnc``. A refusal closes the websocket with code
4000 and the one-line reason.
"""

from __future__ import annotations

from aiohttp import web

from ferry.client.vnc import relay_to_browser
from ferry.errors import FerryError
from ferry.web import context

REFUSED = 4000  # a websocket close code in the range left to applications


async def vnc(request: web.Request) -> web.StreamResponse:
    sent = request.headers.get("Origin")
    if sent is None or sent.removeprefix("http://") not in request.app[context.ORIGIN].hosts:
        return web.Response(status=403, text=f"ferry web: websocket from another origin "
                            f"({sent or 'none'}) refused\n")  # fmt: skip
    ws = web.WebSocketResponse(max_msg_size=0, heartbeat=30)
    await ws.prepare(request)
    try:
        await relay_to_browser(context.ops(request).fleet, request.match_info["name"],
                               request.query.get("host") or None, ws)  # fmt: skip
    except FerryError as exc:
        await ws.close(code=REFUSED, message=exc.message.encode()[:120])
    return ws


def routes() -> list[web.RouteDef]:
    return [web.get("/vms/{name}/vnc", vnc)]
