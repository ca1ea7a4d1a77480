"""The primary's side of the replica broker: a transport to whichever node holds the replica.

A relationship to ``cluster:C`` names the cluster and the addresses of its
nodes (``replica_url``, comma-separated, as ``replication enable`` found them)
and pins the cluster: the thumbprint of the CA that issued C's node
certificates, and the name ``C.cluster.ferry`` every one of them carries
(:func:`ferry.core.replication.authority.cluster_san`). TLS checks that name as
the host name of every node it talks to, and the CA is this host's trust
anchor, whose thumbprint must be the pinned one.

Before the first request about a replica VM (a path ``/v1/peer/replicas/<uuid>``)
the transport asks the nodes in turn which node holds it (``LOCATE``); a node
that is not the owner names it, and the owner is asked again (it takes the
replica over from the cluster's record then). Every request of this client
then goes to the owner. An offer (no uuid yet) goes to the first node that
answers. The client lives for one cycle or command, so the next one locates
again: after a node loss or a move inside C it lands on the new owner.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterable
from typing import Any

from ferry.core.replication.authority import cluster_san
from ferry.core.replication.broker import PREFIX, BrokerPin
from ferry.errors import AuthError, ConnectionFailedError, FerryError
from ferry.peer.https import HttpsTransport, ServerTrust, raise_for_error
from ferry.peer.replication import LOCATE, BrokerOwner
from ferry.peer.transport import Reply

_UUID_IN_PATH = re.compile(r"^/v1/peer/replicas/([^/]+)")


def is_cluster_target(name: str) -> bool:
    return name.startswith(PREFIX)


class BrokerTransport:
    """Requests about one replica VM of cluster ``name`` (``cluster:C``), to its owner."""

    def __init__(self, name: str, urls: str, tls: ssl.SSLContext, *, timeout: float,
                 pin: str | None, ca_thumbprint: str,
                 trust: ServerTrust | None = None) -> None:  # fmt: skip
        self.cluster = name[len(PREFIX) :]
        self.urls = [u.strip() for u in urls.split(",") if u.strip()]
        self.pin = BrokerPin(self.cluster, pin) if pin else None
        self.ca_thumbprint = ca_thumbprint
        self._tls = tls
        self._timeout = timeout
        self._trust = trust
        self._owner: HttpsTransport | None = None
        self.node = ""  # the node this client talks to, once located

    def _transport(self, node: str, url: str) -> HttpsTransport:
        return HttpsTransport(node, url, self._tls, server_name=cluster_san(self.cluster),
                              timeout=self._timeout, trust=self._trust)  # fmt: skip

    def _check_ca(self) -> None:
        if self.pin is not None and self.pin.ca_thumbprint.lower() != self.ca_thumbprint.lower():
            raise AuthError(f"replica cluster {self.cluster!r} is pinned to CA "
                            f"{self.pin.ca_thumbprint[:16]}..., but this host trusts CA "
                            f"{self.ca_thumbprint[:16]}... now")  # fmt: skip

    async def _first_answer(self, path: str, uuid: str | None) -> tuple[HttpsTransport, Reply]:
        """The first node that answers ``LOCATE`` (or, without a uuid, is reachable)."""
        failures: list[str] = []
        for url in self.urls:
            transport = self._transport(f"{PREFIX}{self.cluster}", url)
            try:
                if uuid is None:
                    return transport, Reply(200, None)
                reply = await transport.request("GET", LOCATE.url(cluster=self.cluster, uuid=uuid))
                if reply.status >= 500:  # its agent or its store cannot answer: the next
                    failures.append(f"{url}: HTTP {reply.status}")
                    await transport.close()
                    continue
                return transport, reply
            except ConnectionFailedError as exc:
                failures.append(str(exc))
                await transport.close()
        raise ConnectionFailedError(f"no node of replica cluster {self.cluster!r} answers "
                                    f"({'; '.join(failures) or 'no address known'})")  # fmt: skip

    async def _locate(self, path: str) -> HttpsTransport:
        self._check_ca()
        match = _UUID_IN_PATH.match(path)
        uuid = match.group(1) if match else None
        transport, reply = await self._first_answer(path, uuid)
        if uuid is None:
            return transport
        try:
            raise_for_error(reply.status, reply.payload)
            owner = BrokerOwner.model_validate(reply.payload)
        except BaseException:
            await transport.close()
            raise
        if owner.url.rstrip("/") != transport.url:
            await transport.close()
            transport = self._transport(owner.node, owner.url)
            reply = await transport.request("GET", LOCATE.url(cluster=self.cluster, uuid=uuid))
            try:
                raise_for_error(reply.status, reply.payload)
            except FerryError:
                await transport.close()
                raise
        self.node = owner.node
        return transport

    async def request(self, method: str, path: str, *, body: Any = None,
                      params: dict[str, str] | None = None,
                      data: bytes | AsyncIterable[bytes] | None = None) -> Reply:  # fmt: skip
        if self._owner is None:
            self._owner = await self._locate(path)
        reply = await self._owner.request(method, path, body=body, params=params, data=data)
        return Reply(reply.status, reply.payload, self.ca_thumbprint)

    async def close(self) -> None:
        if self._owner is not None:
            await self._owner.close()
            self._owner = None
