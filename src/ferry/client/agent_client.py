"""An async client for one agent's API, over mutual TLS (the CLI's, with an admin cert).

It speaks through :class:`ferry.peer.https.HttpsTransport`, the same transport
the agents use between themselves, so errors are translated in one place.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import aiohttp

from ferry.errors import ThumbprintMismatchError
from ferry.peer.https import HttpsTransport, raise_for_error

DEFAULT_TIMEOUT_S = 600.0

__all__ = ["DEFAULT_TIMEOUT_S", "AgentClient", "ThumbprintMismatchError"]


class AgentClient:
    """Talks to the agent of host ``name`` at ``url``; use as an async context."""

    def __init__(
        self,
        name: str,
        url: str,
        tls: ssl.SSLContext,
        *,
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        pin: str | None = None,
    ) -> None:
        """``pin``: the SHA-256 thumbprint the agent's certificate must have.

        Every response is checked before its body is read; ``thumbprint`` holds
        the last one seen.
        """
        self.name = name
        self.thumbprint: str | None = None
        self.url = url.rstrip("/")
        self._transport = HttpsTransport(
            name, url, tls, server_name=server_name, timeout=timeout, pin=pin
        )

    @property
    def pin(self) -> str | None:
        return self._transport.pin

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        data: bytes | AsyncIterable[bytes] | None = None,
    ) -> Any:
        reply = await self._transport.request(method, path, body=body, params=params, data=data)
        self.thumbprint = reply.thumbprint or self.thumbprint
        raise_for_error(reply.status, reply.payload)
        return reply.payload

    async def get(self, path: str, **params: str) -> Any:
        return await self.call("GET", path, params=params or None)

    async def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return await self.call("POST", path, body=body or {})

    async def delete(self, path: str, **params: str) -> Any:
        return await self.call("DELETE", path, params=params or None)

    def websocket(self, path: str) -> AbstractAsyncContextManager[aiohttp.ClientWebSocketResponse]:
        """A websocket to the agent (``async with``), e.g. a VM's VNC display."""
        return self._transport.websocket(path)
