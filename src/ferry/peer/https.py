"""The real transport: HTTPS with mutual TLS to one agent (aiohttp).

Foreign errors (aiohttp, ssl, OS, timeouts, non-JSON replies) become
FerryErrors here, the one boundary where they enter; an agent's JSON error is
rebuilt into the FerryError class it was on that agent. The admin client
(:class:`ferry.client.agent_client.AgentClient`) and the peer client use this
same transport.
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Protocol

import aiohttp

from ferry.errors import (
    AuthError,
    ConnectionFailedError,
    FerryError,
    ThumbprintMismatchError,
    error_from_code,
)
from ferry.peer.transport import Reply


def _server_der(response: aiohttp.ClientResponse) -> bytes | None:
    # A small body arrives with the headers and releases the connection at
    # once, so ``response.connection`` is often None here; the protocol (and
    # its TLS transport) outlives that. aiohttp has no public accessor.
    protocol = getattr(response, "_protocol", None)
    transport = getattr(protocol, "transport", None)
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return der or None


class ServerTrust(Protocol):
    """What an agent adds to the CA check of the agents it calls (host/certificates.py).

    ``check_server`` raises AuthError for a revoked certificate and
    ThumbprintMismatchError unless ``der`` is ``name``'s pinned certificate
    (or the one it was renewed to, during the grace period).
    """

    def check_server(self, name: str, where: str, pin: str | None, der: bytes | None) -> None: ...


def check_pin(where: str, pin: str | None, der: bytes | None) -> None:
    """ThumbprintMismatchError unless ``der`` has thumbprint ``pin`` (no pin: anything)."""
    thumbprint = hashlib.sha256(der).hexdigest() if der else None
    if pin and thumbprint != pin:
        raise ThumbprintMismatchError(
            f"{where} presented certificate thumbprint {thumbprint}, not the pinned {pin}",
            found=thumbprint or "",
        )


def raise_for_error(status: int, payload: Any) -> None:
    """Rebuild the agent's error reply into its FerryError class."""
    if status >= 400:
        error = (payload or {}).get("error") or {} if isinstance(payload, dict) else {}
        raise error_from_code(
            str(error.get("code", "error")), str(error.get("message", f"HTTP {status}"))
        )


class HttpsTransport:
    """Requests to the agent of host ``name`` at ``url`` over one aiohttp session.

    ``pin``: the SHA-256 thumbprint the agent's certificate must have; it is
    checked on every response before its body is read (by ``trust`` if given).
    """

    def __init__(
        self,
        name: str,
        url: str,
        tls: ssl.SSLContext,
        *,
        server_name: str | None = None,
        timeout: float,
        pin: str | None = None,
        trust: ServerTrust | None = None,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.pin = pin
        self._trust = trust
        self._tls = tls
        self._server_name = server_name or name
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @contextlib.asynccontextmanager
    async def websocket(self, path: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        """A websocket to ``path`` (its own session: no total timeout on a long relay)."""
        where = f"host {self.name!r} at {self.url}"
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_connect=10))
        try:
            try:
                ws = await session.ws_connect(self.url + path, ssl=self._tls,
                                              server_hostname=self._server_name,
                                              heartbeat=30, max_msg_size=0)  # fmt: skip
            except aiohttp.WSServerHandshakeError as exc:
                raise ConnectionFailedError(
                    f"{where} refused the websocket {path}: HTTP {exc.status}"
                ) from exc
            except aiohttp.ClientConnectorCertificateError as exc:
                raise AuthError(
                    f"{where} presented a certificate we do not trust: {exc.certificate_error}"
                ) from exc
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise ConnectionFailedError(f"cannot open a websocket to {where}: {exc}") from exc
            ssl_object = ws.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            try:
                self._check_server(where, der)
            except FerryError:
                await ws.close()
                raise
            try:
                yield ws
            finally:
                await ws.close()
        finally:
            await session.close()

    def _check_server(self, where: str, der: bytes | None) -> None:
        if self._trust is not None:
            self._trust.check_server(self.name, where, self.pin, der)
        else:
            check_pin(where, self.pin, der)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        data: bytes | AsyncIterable[bytes] | None = None,
    ) -> Reply:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        where = f"host {self.name!r} at {self.url}"
        try:
            async with self._session.request(
                method,
                self.url + path,
                json=body if data is None else None,
                data=data,
                params=params,
                ssl=self._tls,
                server_hostname=self._server_name,
            ) as response:
                der = _server_der(response)
                self._check_server(where, der)
                thumbprint = hashlib.sha256(der).hexdigest() if der else None
                payload = await response.json(content_type=None)
                return Reply(response.status, payload, thumbprint)
        except FerryError:
            raise
        except aiohttp.ClientConnectorCertificateError as exc:
            raise AuthError(
                f"{where} presented a certificate we do not trust: {exc.certificate_error}"
            ) from exc
        except aiohttp.ClientConnectorSSLError as exc:
            raise AuthError(f"TLS with {where} failed: {exc.os_error}") from exc
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or str(exc.os_error)
            raise ConnectionFailedError(
                f"cannot reach {where}: {reason}; is its agent running? ('ferry lab status')"
            ) from exc
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            cause = exc.__cause__ or exc.__context__ or exc
            if isinstance(exc, ssl.SSLError) or isinstance(cause, ssl.SSLError):
                raise AuthError(f"{where} refused our certificate: {exc}") from exc
            raise ConnectionFailedError(f"connection to {where} broke: {exc}") from exc
        except TimeoutError as exc:
            raise ConnectionFailedError(f"{where} did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise ConnectionFailedError(f"talking to {where} failed: {exc}") from exc
        except ValueError as exc:
            raise ConnectionFailedError(f"{where} sent a reply that is not JSON") from exc
