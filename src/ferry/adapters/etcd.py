"""The cluster store on etcd v3: a thin async client of etcd's JSON gateway (aiohttp, mutual TLS).

:class:`EtcdStore` implements :class:`ferry.core.cluster.store.ClusterStore`.
etcd serves its gRPC API as JSON over HTTP (the grpc-gateway, ``/v3/...``), so
this needs no grpc or protobuf. The wire format is in
:mod:`ferry.adapters.etcd_wire`.

Failures (aiohttp, OS, TLS, timeouts, an etcd that cannot serve) become
:class:`StoreUnavailableError` naming the URL(s) here and nowhere else; a lease
that is gone is :class:`LeaseLostError`. Reads and keepalives fail over to the
next endpoint on any failure; a write fails over only while it surely never
reached etcd (the connection could not be made), since repeating a transaction
that did apply would report it lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ferry.adapters import etcd_wire as wire
from ferry.adapters import pki
from ferry.core.cluster.store import (
    Compare,
    Entry,
    EventKind,
    Op,
    Put,
    TxnResult,
    WatchEvent,
)
from ferry.errors import InvalidInputError, LeaseLostError, StoreUnavailableError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
# A watch that hears nothing (no event, no progress notification) for this
# long reconnects from where it was: a silently dead connection ends so.
DEFAULT_WATCH_IDLE_S = 30.0


@dataclass(frozen=True)
class _Failure:
    """One endpoint did not serve a call."""

    url: str
    reason: str
    maybe_applied: bool  # the request may have reached etcd: its outcome is unknown
    dropped: bool = False  # the connection closed under it (e.g. pooled from before a restart)


class EtcdStore:
    """A :class:`~ferry.core.cluster.store.ClusterStore` on the etcd members at ``endpoints``.

    ``tls``: the client context (the host's certificate, the ferry CA); None
    for plain ``http://`` endpoints. ``timeout_s`` bounds each call to one
    endpoint. A watch is an async generator: close it (``aclose``, or
    ``contextlib.aclosing``) to end its stream at once.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        tls: ssl.SSLContext | None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        watch_idle_s: float = DEFAULT_WATCH_IDLE_S,
    ) -> None:
        urls = tuple(url.rstrip("/") for url in endpoints)
        if not urls:
            raise InvalidInputError("a cluster store needs at least one etcd URL")
        for url in urls:
            if not url.startswith(("https://", "http://")):
                raise InvalidInputError(f"etcd URL {url!r} must start with https:// or http://")
        self._urls = urls
        self._preferred = 0
        self._tls: ssl.SSLContext | bool = tls if tls is not None else True
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._watch_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout_s, sock_read=watch_idle_s
        )
        self._session: aiohttp.ClientSession | None = None

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._urls

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def _rotation(self) -> list[str]:
        """The endpoints, the one that served last first."""
        first = self._preferred
        return [*self._urls[first:], *self._urls[:first]]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- one call, failing over ---------------------------------------------

    async def _attempt(
        self, url: str, path: str, body: dict[str, Any]
    ) -> dict[str, Any] | _Failure:
        try:
            async with self._http().post(
                url + path, json=body, ssl=self._tls, timeout=self._timeout
            ) as response:
                text = await response.text()
        except aiohttp.ClientConnectorError as exc:
            return _Failure(url, str(exc.os_error) or str(exc), maybe_applied=False)
        except aiohttp.ServerDisconnectedError as exc:
            return _Failure(url, str(exc), maybe_applied=True, dropped=True)
        except (aiohttp.ClientError, OSError) as exc:
            return _Failure(url, str(exc) or type(exc).__name__, maybe_applied=True)
        except TimeoutError:
            return _Failure(url, "no answer in time", maybe_applied=True)
        try:
            # A stream (keepalive) holds one JSON object per line; we ask for one.
            payload = json.loads(text.splitlines()[0]) if text.strip() else {}
        except ValueError:
            return _Failure(url, f"HTTP {response.status}, not JSON", maybe_applied=True)
        if not isinstance(payload, dict):
            return _Failure(url, f"HTTP {response.status}, not a JSON object", maybe_applied=True)
        result = payload.get("result", payload)
        if response.status != 200 and wire.refusal(payload) is None:
            return _Failure(url, f"HTTP {response.status}", maybe_applied=True)
        return result if isinstance(result, dict) else payload

    async def _call(
        self, path: str, body: dict[str, Any], what: str, *, retry_safe: bool
    ) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the first endpoint that serves it.

        ``retry_safe``: repeating the call on another endpoint is harmless
        (reads, keepalives), so any failure moves on; else only a connection
        that was never made does; a dropped connection is tried once more.
        """
        failures: list[_Failure] = []
        pending, retried = self._rotation(), set()
        while pending:
            url = pending.pop(0)
            reply = await self._attempt(url, path, body)
            if isinstance(reply, dict):
                refused = wire.refusal(reply)
                if refused is None:
                    self._preferred = self._urls.index(url)
                    return reply
                code, message = refused
                if code == wire.GRPC_NOT_FOUND and "lease not found" in message:
                    raise LeaseLostError(f"etcd at {url}: {what}: the lease is gone ({message})")
                if code == wire.GRPC_INVALID_ARGUMENT:
                    raise InvalidInputError(f"etcd at {url} refused {what}: {message}")
                reply = _Failure(url, message, maybe_applied=True)
            if reply.dropped and retry_safe and url not in retried:
                retried.add(url)  # on a new connection: the old one may have outlived a restart
                pending.insert(0, url)
                continue
            failures.append(reply)
            log.warning("etcd at %s: %s failed: %s", url, what, reply.reason)
            if reply.maybe_applied and not retry_safe:
                raise StoreUnavailableError(
                    f"etcd at {url} did not confirm {what} ({reply.reason}); "
                    "it may or may not have been applied: read it back"
                )
        reasons = "; ".join(f"{f.url}: {f.reason}" for f in failures)
        raise StoreUnavailableError(f"cannot reach the cluster store for {what}: {reasons}")

    # -- keys ----------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        reply = await self._call(
            "/v3/kv/range", wire.key_range(key, False), f"read {key}", retry_safe=True
        )
        kvs = reply.get("kvs") or []
        return wire.entry(kvs[0]) if kvs else None

    async def range(self, prefix: str) -> list[Entry]:
        body: dict[str, Any] = {
            **wire.key_range(prefix, True),
            "sort_order": "ASCEND",
            "sort_target": "KEY",
        }
        reply = await self._call("/v3/kv/range", body, f"read {prefix}*", retry_safe=True)
        return [wire.entry(kv) for kv in reply.get("kvs") or []]

    async def revision(self) -> int:
        body = {**wire.key_range("\0", False), "count_only": True}
        reply = await self._call("/v3/kv/range", body, "read the revision", retry_safe=True)
        return wire.int_field(reply.get("header") or {}, "revision")

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        body = wire.op(Put(key, value, lease))["request_put"]
        reply = await self._call("/v3/kv/put", body, f"write {key}", retry_safe=False)
        return wire.int_field(reply.get("header") or {}, "revision")

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        what = f"delete {key}{'*' if prefix else ''}"
        reply = await self._call(
            "/v3/kv/deleterange", wire.key_range(key, prefix), what, retry_safe=False
        )
        return wire.int_field(reply, "deleted")

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        body = {
            "compare": [wire.compare(c) for c in compares],
            "success": [wire.op(op) for op in success],
            "failure": [wire.op(op) for op in failure],
        }
        keys = ", ".join(sorted({c.key for c in compares})) or "no keys"
        reply = await self._call("/v3/kv/txn", body, f"transaction on {keys}", retry_safe=False)
        return TxnResult(
            succeeded=bool(reply.get("succeeded")),
            revision=wire.int_field(reply.get("header") or {}, "revision"),
        )

    async def compact(self, revision: int) -> None:
        """Drop the history before ``revision`` (maintenance; a watch from before it fails)."""
        body = {"revision": str(revision), "physical": True}
        await self._call("/v3/kv/compaction", body, f"compact to {revision}", retry_safe=True)

    # -- leases --------------------------------------------------------------

    async def grant(self, ttl_s: int) -> int:
        if ttl_s < 1:
            raise InvalidInputError(f"a lease TTL is at least 1 s, not {ttl_s}")
        # Not retry-safe: a repeat would leave the first lease to expire unused.
        body = {"TTL": str(ttl_s), "ID": "0"}
        reply = await self._call(
            "/v3/lease/grant", body, f"grant a {ttl_s} s lease", retry_safe=False
        )
        return wire.int_field(reply, "ID")

    async def keepalive(self, lease: int) -> int:
        what = f"renew lease {lease:x}"
        reply = await self._call("/v3/lease/keepalive", {"ID": str(lease)}, what, retry_safe=True)
        ttl = wire.int_field(reply, "TTL")
        if ttl <= 0:
            raise LeaseLostError(f"lease {lease:x} expired or was revoked; etcd did not renew it")
        return ttl

    async def time_to_live(self, lease: int) -> int:
        what = f"read lease {lease:x}"
        reply = await self._call("/v3/lease/timetolive", {"ID": str(lease)}, what, retry_safe=True)
        ttl = int(reply.get("TTL") or 0)
        return -1 if ttl < 0 else ttl

    async def revoke(self, lease: int) -> None:
        what = f"revoke lease {lease:x}"
        with contextlib.suppress(LeaseLostError):  # already gone: that is what was asked
            await self._call("/v3/lease/revoke", {"ID": str(lease)}, what, retry_safe=True)

    # -- watch ---------------------------------------------------------------

    async def _watch_stream(
        self, url: str, prefix: str, create: dict[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The ``result`` objects of one watch stream at ``url``, until it ends."""
        async with self._http().post(
            url + "/v3/watch",
            json={"create_request": create},
            ssl=self._tls,
            timeout=self._watch_timeout,
        ) as response:
            if response.status != 200:
                raise aiohttp.ClientResponseError(response.request_info, (), status=response.status)
            try:
                buffer = b""
                async for chunk in response.content.iter_any():
                    *lines, buffer = (buffer + chunk).split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        message = json.loads(line)
                        result = message.get("result")
                        if not isinstance(result, dict):
                            refused = wire.refusal(message)
                            raise StoreUnavailableError(
                                f"etcd at {url} ended the watch of {prefix}: "
                                f"{refused[1] if refused else message}"
                            )
                        yield result
            finally:
                # Left before its end: drop the connection now. A graceful TLS
                # close would finish later, or never if the event loop ends first.
                connection = response.connection
                if connection is not None and connection.transport is not None:
                    connection.transport.abort()

    async def watch(
        self, prefix: str, *, start_revision: int = 0
    ) -> AsyncGenerator[WatchEvent, None]:
        """Changes under ``prefix``, in order; see the protocol.

        A stream that breaks or stays silent is opened again from the revision
        after the last one seen (on the next endpoint), so nothing is lost or
        repeated. Raises StoreUnavailableError when no endpoint opens it, or
        when etcd compacted the history it needs (read again, then watch from
        the revision that read returned).
        """
        next_revision = start_revision  # 0: from now, until etcd says where "now" is
        misses = 0  # endpoints tried in a row that did not open the stream
        failures: list[str] = []
        while misses < len(self._urls):
            url = self._rotation()[0]
            create: dict[str, Any] = {**wire.key_range(prefix, True), "progress_notify": True}
            if next_revision:
                create["start_revision"] = str(next_revision)
            opened = False
            reason = "the stream ended"
            try:
                # aclosing: leaving the loop (a raise) must end the stream now, not at GC.
                async with contextlib.aclosing(self._watch_stream(url, prefix, create)) as stream:
                    async for result in stream:
                        header_revision = wire.int_field(result.get("header") or {}, "revision")
                        if result.get("canceled"):
                            compacted = wire.int_field(result, "compact_revision")
                            if compacted:
                                raise StoreUnavailableError(
                                    f"etcd at {url} compacted the history of {prefix} up to "
                                    f"revision {compacted}, past the watch's {next_revision}: "
                                    "read again and watch from there"
                                )
                            cause = result.get("cancel_reason", "no reason given")
                            raise StoreUnavailableError(
                                f"etcd at {url} canceled the watch of {prefix}: {cause}"
                            )
                        if result.get("created"):
                            opened, misses, failures = True, 0, []
                            self._preferred = self._urls.index(url)
                            next_revision = next_revision or header_revision + 1
                            continue
                        events = result.get("events") or []
                        for event in events:
                            entry = wire.entry(event["kv"])
                            deleted = event.get("type") == "DELETE"
                            next_revision = entry.mod_revision + 1
                            yield WatchEvent(EventKind.DELETE if deleted else EventKind.PUT, entry)
                        if not events and header_revision:  # progress: everything before it sent
                            next_revision = max(next_revision, header_revision + 1)
            except aiohttp.ClientConnectorError as exc:
                reason = str(exc.os_error) or str(exc)
            except (aiohttp.ClientError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
            except TimeoutError:
                reason = "silent for too long"
            except ValueError:
                reason = "a reply that is not JSON"
            log.info("watch of %s at %s broke (%s); opening it again", prefix, url, reason)
            if opened:
                await asyncio.sleep(0.1)  # a member that opens and drops at once: no busy loop
            else:
                misses += 1
                failures.append(f"{url}: {reason}")
            # The next endpoint first; this one again after the others.
            self._preferred = (self._urls.index(url) + 1) % len(self._urls)
        raise StoreUnavailableError(
            f"cannot watch {prefix} in the cluster store: {'; '.join(failures)}"
        )


def open_store(endpoints: Sequence[str], tls_dir: Path | None) -> EtcdStore:
    """An :class:`EtcdStore` with the client certificate in ``tls_dir``.

    ``tls_dir`` holds ``ca-cert.pem client-cert.pem client-key.pem`` (a host's
    TLS dir does); None for plain-HTTP endpoints.
    """
    tls = pki.client_ssl_context(tls_dir) if tls_dir is not None else None
    return EtcdStore(endpoints, tls)
