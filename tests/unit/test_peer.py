"""The peer layer: routes, the typed client and server, the in-memory network."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from ferry.errors import AuthError, InvalidInputError, NotFoundError, ThumbprintMismatchError
from ferry.peer.client import PeerClient
from ferry.peer.routes import NoBody, Route, Upload
from ferry.peer.server import Call, PeerServer
from ferry.testing.peers import MemoryNetwork, host_cert


class Echo(BaseModel):
    text: str
    count: int = 1


class Echoed(BaseModel):
    text: str
    caller: str
    id: str


class Received(BaseModel):
    size: int


ECHO = Route("POST", "/v1/peer/echo/{id}", Echo, Echoed, status=201)
UPLOAD = Route("PUT", "/v1/peer/blobs/{id}", Upload, Received)
WHO = Route("GET", "/v1/peer/who", NoBody, Echoed)


def test_route_url_and_match() -> None:
    assert ECHO.url(id="a b/c") == "/v1/peer/echo/a%20b%2Fc"
    assert ECHO.match("POST", "/v1/peer/echo/a%20b") == {"id": "a b"}
    assert ECHO.match("GET", "/v1/peer/echo/x") is None
    assert ECHO.match("POST", "/v1/peer/echo/x/y") is None
    with pytest.raises(InvalidInputError):
        ECHO.url()


def _server() -> PeerServer:
    server = PeerServer()

    async def echo(call: Call[Echo]) -> Echoed:
        return Echoed(text=call.body.text * call.body.count, caller=call.require_host(),
                      id=call.params["id"])  # fmt: skip

    async def upload(call: Call[Upload]) -> Received:
        size = 0
        async for chunk in call.stream:
            size += len(chunk)
        return Received(size=size)

    async def who(call: Call[NoBody]) -> Echoed:
        raise NotFoundError(f"nobody here for {call.caller.common_name}")

    server.handle(ECHO, echo)
    server.handle(UPLOAD, upload)
    server.handle(WHO, who)
    return server


def _client(network: MemoryNetwork, frm: str, to: str, pin: str | None = None) -> PeerClient:
    return network.connector(frm).connect(to, f"https://{to}", pin=pin)


def test_typed_round_trip_through_memory_network() -> None:
    network = MemoryNetwork()
    network.join("host-2", _server())
    network.join("host-1", PeerServer())

    async def run() -> None:
        async with _client(network, "host-1", "host-2") as peer:
            reply = await peer.call(ECHO, Echo(text="ab", count=2), id="x")
            assert reply == Echoed(text="abab", caller="host-1", id="x")
            assert peer.thumbprint == network.certs["host-2"].thumbprint

            async def chunks():  # type: ignore[no-untyped-def]
                for _ in range(3):
                    yield b"x" * 10

            assert (await peer.call(UPLOAD, data=chunks(), id="b")).size == 30
            with pytest.raises(NotFoundError, match="nobody here for host-1"):
                await peer.call(WHO)

    asyncio.run(run())
    assert [c[3] for c in network.calls] == ["/v1/peer/echo/x", "/v1/peer/blobs/b", "/v1/peer/who"]


def test_errors_cross_the_wire_as_their_class() -> None:
    network = MemoryNetwork()
    network.join("host-2", _server())
    network.join("admin", PeerServer(), host_cert("admin", role=None))

    async def run() -> None:
        async with _client(network, "admin", "host-2") as peer:
            with pytest.raises(AuthError, match="only a ferry host"):
                await peer.call(ECHO, Echo(text="a"), id="x")
        server = network.servers["host-2"]
        status, payload = await server.dispatch(host_cert("host-1"), "POST", "/v1/peer/echo/x",
                                                body=b'{"count": 2}')  # fmt: skip
        assert status == 400 and payload["error"]["code"] == "invalid-input"
        assert "text" in payload["error"]["message"]
        status, payload = await server.dispatch(host_cert("host-1"), "GET", "/v1/peer/nothing")
        assert status == 404

    asyncio.run(run())


def test_pin_is_checked_before_the_call_reaches_the_server() -> None:
    network = MemoryNetwork()
    network.join("host-2", _server())
    network.join("host-1", PeerServer())

    async def run() -> None:
        async with _client(network, "host-1", "host-2", pin="0" * 64) as peer:
            with pytest.raises(ThumbprintMismatchError) as info:
                await peer.call(ECHO, Echo(text="a"), id="x")
            assert info.value.found == network.certs["host-2"].thumbprint

    asyncio.run(run())
    assert network.calls == []


def test_a_handler_is_registered_once() -> None:
    server = _server()

    async def again(call: Call[Echo]) -> Echoed:
        raise AssertionError

    with pytest.raises(ValueError, match="has a handler already"):
        server.handle(ECHO, again)
