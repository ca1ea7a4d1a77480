"""An async client for one agent's API, over mutual TLS.

Foreign errors (aiohttp, ssl, OS) become FerryErrors here, and the agent's
JSON errors are rebuilt into the FerryError class they were on the agent.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import AsyncIterable
from types import TracebackType
from typing import Any

import aiohttp

from ferry.errors import AuthError, ConnectionFailedError, FerryError, error_from_code

DEFAULT_TIMEOUT_S = 600.0


class ThumbprintMismatchError(AuthError):
    """The agent presented a valid certificate, but not the pinned one."""

    def __init__(self, message: str, *, found: str) -> None:
        super().__init__(message)
        self.found = found


def _server_thumbprint(response: aiohttp.ClientResponse) -> str | None:
    # A small body arrives with the headers and releases the connection at
    # once, so ``response.connection`` is often None here; the protocol (and
    # its TLS transport) outlives that. aiohttp has no public accessor.
    protocol = getattr(response, "_protocol", None)
    transport = getattr(protocol, "transport", None)
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return hashlib.sha256(der).hexdigest() if der else None


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
        the last one seen (what a relationship pins when it is made).
        """
        self.name = name
        self.pin = pin
        self.thumbprint: str | None = None
        self.url = url.rstrip("/")
        self._tls = tls
        self._server_name = server_name or name
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AgentClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        data: bytes | AsyncIterable[bytes] | None = None,
    ) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        where = f"host {self.name!r} at {self.url}"
        try:
            async with self._session.request(
                method,
                self.url + path,
                json=body,
                data=data,
                params=params,
                ssl=self._tls,
                server_hostname=self._server_name,
            ) as response:
                self.thumbprint = _server_thumbprint(response) or self.thumbprint
                if self.pin and self.thumbprint != self.pin:
                    raise ThumbprintMismatchError(
                        f"{where} presented certificate thumbprint {self.thumbprint}, "
                        f"not the pinned {self.pin}",
                        found=self.thumbprint or "",
                    )
                payload = await response.json(content_type=None)
                if response.status >= 400:
                    error = (payload or {}).get("error") or {}
                    raise error_from_code(
                        str(error.get("code", "error")),
                        str(error.get("message", f"HTTP {response.status}")),
                    )
                return payload
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

    async def get(self, path: str, **params: str) -> Any:
        return await self.call("GET", path, params=params or None)

    async def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return await self.call("POST", path, body=body or {})

    async def delete(self, path: str, **params: str) -> Any:
        return await self.call("DELETE", path, params=params or None)
