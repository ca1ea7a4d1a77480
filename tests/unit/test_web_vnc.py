"""The VM page's graphical console: its panel, and the websocket joined to the agent's relay."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from tests.unit.web_fake import FakeFleet, vm_view
from tests.unit.web_harness import Console, run_console

BANNER = b"RFB 003.008\n"


class FakeAgentSocket:
    """The agent's end of ``GET /v1/vms/NAME/vnc``: says the RFB banner, then echoes."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.sent: list[bytes] = []
        self.closed = False

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)
        await self.inbox.put(data)

    async def send_str(self, data: str) -> None:
        await self.send_bytes(data.encode())

    async def close(self) -> bool:
        self.closed = True
        await self.inbox.put(None)
        return True

    def __aiter__(self) -> AsyncIterator[aiohttp.WSMessage]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[aiohttp.WSMessage]:
        yield aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, BANNER, None)
        while (data := await self.inbox.get()) is not None:
            yield aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, data, None)


def _fleet(**extra: Any) -> tuple[FakeFleet, FakeAgentSocket, list[str]]:
    fleet = FakeFleet("host-1", "host-2")
    fleet.agents["host-1"].vms["g1"] = vm_view("g1", "host-1", **extra)
    agent_end, opened = FakeAgentSocket(), []

    @contextlib.asynccontextmanager
    async def websocket(path: str) -> AsyncIterator[FakeAgentSocket]:
        opened.append(path)
        yield agent_end

    fleet.agents["host-1"].websocket = websocket  # type: ignore[method-assign,assignment]
    return fleet, agent_end, opened


def test_the_panel_is_there_only_for_a_vm_with_a_display() -> None:
    async def body(console: Console) -> tuple[str, str]:
        return await console.page("/vms/g1"), ""

    html, _ = run_console(_fleet(display="vnc", vnc=True)[0], body)
    assert 'data-testid="vnc-screen"' in html and 'data-src="/vms/g1/vnc"' in html
    assert '<script type="module" src="/static/ferry-vnc.js"></script>' in html
    html, _ = run_console(_fleet()[0], body)
    assert 'data-testid="vnc"' not in html and "ferry-vnc.js" not in html


def test_the_websocket_joins_the_browser_to_the_agents_relay() -> None:
    fleet, agent_end, opened = _fleet(display="vnc", vnc=True)

    async def body(console: Console) -> tuple[bytes, bytes]:
        origin = {"Origin": console.origin}
        async with console.client.ws_connect("/vms/g1/vnc", headers=origin) as ws:
            banner = await ws.receive_bytes(timeout=5)
            await ws.send_bytes(b"\x01hello")
            echoed = await ws.receive_bytes(timeout=5)
        return banner, echoed

    assert run_console(fleet, body) == (BANNER, b"\x01hello")
    assert opened == ["/v1/vms/g1/vnc"] and agent_end.sent == [b"\x01hello"]


def test_another_origin_or_no_display_is_refused() -> None:
    fleet, _, opened = _fleet()

    async def body(console: Console) -> tuple[int, int, str]:
        reply = await console.client.get("/vms/g1/vnc", headers={"Origin": "http://evil.example"})
        origin = {"Origin": console.origin}
        async with console.client.ws_connect("/vms/g1/vnc", headers=origin) as ws:
            message = await ws.receive(timeout=5)
        return reply.status, message.type.value, str(ws.close_code) + " " + (message.extra or "")

    status, kind, closed = run_console(fleet, body)
    assert status == 403
    assert kind == aiohttp.WSMsgType.CLOSE.value
    assert closed.startswith("4000 ") and "has no VNC display" in closed
    assert opened == []


def test_without_a_session_the_websocket_is_refused() -> None:
    fleet, _, opened = _fleet(display="vnc", vnc=True)

    async def body(console: Console) -> int:
        reply = await console.client.get("/vms/g1/vnc", headers={"Origin": console.origin})
        return reply.status

    assert run_console(fleet, body, sign_in=False) == 403
    assert opened == []
