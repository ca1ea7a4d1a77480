"""The typed peer client: one agent calling another's ``/v1/peer/...`` endpoints.

Host services never build a client themselves: they get a :class:`Connector`
(built once per agent from the host's certificate, see :class:`PeerConnector`)
and ask it for a :class:`PeerClient` to one host, with one of the timeout
policies below and, for replication, the pinned thumbprint. Every call names
a :class:`ferry.peer.routes.Route`; the body is that route's request model
and the reply comes back validated as its reply model.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterable
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from ferry.adapters.pki import client_ssl_context, thumbprint
from ferry.adapters.pki.files import CA_CERT
from ferry.core.validation import first_error
from ferry.errors import ConnectionFailedError
from ferry.peer.broker import BrokerTransport, is_cluster_target
from ferry.peer.https import HttpsTransport, ServerTrust, raise_for_error
from ferry.peer.routes import NoBody, Route, Upload
from ferry.peer.transport import Transport

Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)


class Timeout(float, Enum):
    """How long one peer call may take, by the kind of work behind it (seconds)."""

    PROBE = 5.0  # a liveness or split-brain check: an answer now, or none
    CONTROL = 120.0  # a step of a move or failover: quick on the other side
    TRANSFER = 3600.0  # a call that carries or waits for disk data


class PeerClient:
    """Calls to the agent of host ``name``; use as an async context."""

    def __init__(self, name: str, url: str, transport: Transport) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.thumbprint: str | None = None  # of the last reply: what a relationship pins
        self._transport = transport

    async def __aenter__(self) -> PeerClient:
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
        route: Route[Req, Rep],
        body: Req | None = None,
        *,
        data: bytes | AsyncIterable[bytes] | None = None,
        query: dict[str, str] | None = None,
        **params: str,
    ) -> Rep:
        """Call ``route`` with path ``params``; the reply as the route's model."""
        payload: Any = None
        if route.upload:
            if data is None:
                raise ValueError(f"{route.path} carries a byte stream: pass data=")
        elif body is not None:
            payload = body.model_dump(mode="json", exclude_unset=False)
        elif route.request is not NoBody:
            raise ValueError(f"{route.path} needs a {route.request.__name__} body")
        reply = await self._transport.request(
            route.method, route.url(**params), body=payload, params=query, data=data
        )
        self.thumbprint = reply.thumbprint or self.thumbprint
        raise_for_error(reply.status, reply.payload)
        try:
            return route.parse_reply(reply.payload)
        except ValidationError as exc:
            raise ConnectionFailedError(
                f"host {self.name!r} sent a reply to {route.method} {route.path} that ferry "
                f"cannot read: {first_error(exc, whole='reply')}"
            ) from exc


class Connector(Protocol):
    """What host services are given to reach other hosts."""

    def connect(
        self, name: str, url: str, *, timeout: Timeout = Timeout.CONTROL, pin: str | None = None
    ) -> PeerClient: ...


class PeerConnector:
    """Builds peer clients with this host's certificate (the TLS context made once).

    ``trust`` (the agent's :class:`ferry.host.certificates.HostCertificates`)
    refuses revoked agents and follows renewed pins; :meth:`reload` puts a
    renewed certificate into the one context, for the connections made after.
    """

    def __init__(self, tls_dir: Path, trust: ServerTrust | None = None) -> None:
        self._tls: ssl.SSLContext = client_ssl_context(tls_dir)
        self.trust = trust
        # What a replica cluster's pin names (the replica broker, ferry.peer.broker).
        self.ca_thumbprint = thumbprint(tls_dir / CA_CERT)

    def reload(self, cert: Path, key: Path) -> None:
        """Present ``cert`` from now on (connections already open keep the old one)."""
        self._tls.load_cert_chain(certfile=str(cert), keyfile=str(key))

    def connect(
        self, name: str, url: str, *, timeout: Timeout = Timeout.CONTROL, pin: str | None = None
    ) -> PeerClient:
        if is_cluster_target(name):  # url: the cluster's node addresses, comma-separated
            broker = BrokerTransport(
                name,
                url,
                self._tls,
                timeout=float(timeout),
                pin=pin,
                ca_thumbprint=self.ca_thumbprint,
                trust=self.trust,
            )
            return PeerClient(name, url, broker)
        transport = HttpsTransport(
            name, url, self._tls, server_name=name, timeout=float(timeout), pin=pin,
            trust=self.trust,
        )  # fmt: skip
        return PeerClient(name, url, transport)


__all__ = ["Connector", "PeerClient", "PeerConnector", "Timeout", "Upload"]
