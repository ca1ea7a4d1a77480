"""How a request reaches another agent: the one-method transport interface.

A :class:`Transport` carries one request and returns a :class:`Reply`; it
never interprets the payload. :class:`ferry.peer.https.HttpsTransport` is the
real one (mutual TLS, the pin checked before the body is read); the in-memory
one in :mod:`ferry.testing.peers` hands the request straight to another host's
:class:`ferry.peer.server.PeerServer`, so host services can be tested against
each other without sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Reply:
    """A decoded reply: HTTP status, JSON payload, and the server's thumbprint."""

    status: int
    payload: Any
    thumbprint: str | None = None


class Transport(Protocol):
    """Carries requests to one agent."""

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        data: bytes | AsyncIterable[bytes] | None = None,
    ) -> Reply:
        """Send ``body`` as JSON, or ``data`` as a raw upload; FerryError on failure."""
        ...

    async def close(self) -> None: ...
