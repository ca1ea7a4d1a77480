"""Runs the web console app under aiohttp's test client, already signed in, over a fake fleet."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp.test_utils import TestClient, TestServer

from ferry.web.app import Origin, build_app
from ferry.web.operations import Operations
from ferry.web.sampler import LagSampler
from ferry.web.session import Sessions
from tests.unit.web_fake import FakeFleet

T = TypeVar("T")
TOKEN = "launch-token-for-tests"


@dataclass
class Console:
    client: TestClient[Any, Any]
    fleet: FakeFleet
    sessions: Sessions
    sampler: LagSampler
    csrf: str = ""

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.client.port}"

    async def sign_in(self) -> None:
        reply = await self.client.get(f"/?token={TOKEN}", allow_redirects=False)
        assert reply.status == 303, await reply.text()
        page = await (await self.client.get("/")).text()
        found = re.search(r'name="csrf" value="([^"]+)"|"X-CSRF-Token": "([^"]+)"', page)
        assert found, page
        self.csrf = found[1] or found[2]

    async def page(self, path: str, status: int = 200) -> str:
        reply = await self.client.get(path)
        text = await reply.text()
        assert reply.status == status, text
        return text

    async def act(self, vm: str, action: str, htmx: bool = True, **form: str) -> tuple[int, str]:
        headers = {"Origin": self.origin}
        if htmx:
            headers["HX-Request"] = "true"
        reply = await self.client.post(
            f"/vms/{vm}/actions/{action}", data={"csrf": self.csrf, **form}, headers=headers
        )
        return reply.status, await reply.text()


def run_console(
    fleet: FakeFleet, body: Callable[[Console], Awaitable[T]], *, sign_in: bool = True
) -> T:
    """Serve the console over ``fleet`` on loopback and run ``body`` against it."""

    async def main() -> T:
        ops = Operations(fleet)
        sessions = Sessions(TOKEN)
        sampler = LagSampler(ops, interval_s=3600)  # tests sample by hand
        origin = Origin()
        app = build_app(ops, sessions, origin=origin, sampler=sampler)
        server = TestServer(app, host="127.0.0.1")
        async with TestClient(server) as client:
            origin.port = server.port or 0
            console = Console(client, fleet, sessions, sampler)
            if sign_in:
                await console.sign_in()
            return await body(console)

    return asyncio.run(main())
