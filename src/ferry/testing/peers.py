"""An in-memory peer network: host services talking to each other without sockets.

Each host joins with its :class:`~ferry.peer.server.PeerServer` and a
:class:`~ferry.adapters.pki.CertInfo` standing for its certificate. A client
made by ``network.connector("host-1").connect("host-2", ...)`` sends its
requests straight into host-2's ``dispatch`` as host-1, with the JSON encoded
and decoded on the way, so payloads are checked as strictly as over HTTPS.
The pin is checked against the target's fake thumbprint.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import Any

from ferry.adapters.pki import CertInfo, Role
from ferry.errors import ConnectionFailedError, ThumbprintMismatchError
from ferry.peer.client import PeerClient, Timeout
from ferry.peer.server import PeerServer
from ferry.peer.transport import Reply


def host_cert(name: str, *, role: Role | None = Role.HOST) -> CertInfo:
    """A stand-in for host ``name``'s certificate, thumbprint derived from the name."""
    ou = "hosts" if role is Role.HOST else "admins" if role is Role.ADMIN else "other"
    return CertInfo(
        subject=f"CN={name},OU={ou},O=ferry",
        common_name=name,
        role=role,
        thumbprint=hashlib.sha256(name.encode()).hexdigest(),
        not_after=dt.datetime(2100, 1, 1, tzinfo=dt.UTC),
        dns_names=(name,),
        ips=("127.0.0.1",),
    )


@dataclass
class MemoryNetwork:
    """The hosts that can reach each other; a host that left is unreachable."""

    servers: dict[str, PeerServer] = field(default_factory=dict)
    certs: dict[str, CertInfo] = field(default_factory=dict)
    calls: list[tuple[str, str, str, str]] = field(default_factory=list)  # from, to, method, path

    def join(self, name: str, server: PeerServer, cert: CertInfo | None = None) -> None:
        self.servers[name] = server
        self.certs[name] = cert or host_cert(name)

    def leave(self, name: str) -> None:
        self.servers.pop(name, None)

    def connector(self, name: str) -> MemoryConnector:
        return MemoryConnector(self, name)


@dataclass
class MemoryConnector:
    """What a host service is given in unit tests instead of a PeerConnector."""

    network: MemoryNetwork
    name: str

    def connect(
        self, name: str, url: str, *, timeout: Timeout = Timeout.CONTROL, pin: str | None = None
    ) -> PeerClient:
        return PeerClient(name, url, MemoryTransport(self.network, self.name, name, pin))


class MemoryTransport:
    """One client's way into another host's PeerServer."""

    def __init__(self, network: MemoryNetwork, caller: str, target: str, pin: str | None) -> None:
        self.network = network
        self.caller = caller
        self.target = target
        self.pin = pin

    async def close(self) -> None:
        return None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        data: bytes | AsyncIterable[bytes] | None = None,
    ) -> Reply:
        server = self.network.servers.get(self.target)
        if server is None:
            raise ConnectionFailedError(f"cannot reach host {self.target!r}: it left the network")
        thumbprint = self.network.certs[self.target].thumbprint
        if self.pin and thumbprint != self.pin:
            raise ThumbprintMismatchError(
                f"host {self.target!r} presented certificate thumbprint {thumbprint}, "
                f"not the pinned {self.pin}",
                found=thumbprint,
            )
        self.network.calls.append((self.caller, self.target, method, path))
        stream: AsyncIterable[bytes] | None = None
        raw = b""
        if isinstance(data, bytes):
            stream = _once(data)
        elif data is not None:
            stream = data
        elif body is not None:
            raw = json.dumps(body).encode()
        status, payload = await server.dispatch(
            self.network.certs[self.caller], method, path, query=params, body=raw, stream=stream
        )
        return Reply(status, json.loads(json.dumps(payload)), thumbprint)


async def _once(data: bytes) -> Any:
    yield data
