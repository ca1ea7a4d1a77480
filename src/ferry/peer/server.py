"""The server side of the peer protocol: routes matched to host-service handlers.

The agent builds one :class:`PeerServer`, and each host service registers a
handler for the routes it answers (``server.handle(ROUTE, handler)``). A
handler gets a :class:`Call` (the verified caller, path parameters, query,
and the body as the route's model, or the upload as an async byte iterator)
and returns the route's reply model; it never sees aiohttp. The HTTPS edge
(:meth:`PeerServer.aiohttp_routes`) and the in-memory transport both enter
through :meth:`PeerServer.dispatch`, so a unit test exercises the same path
as a real request, JSON included.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from ferry.adapters.pki import CertInfo, Role
from ferry.core import log_context
from ferry.core.validation import first_error
from ferry.errors import AuthError, FerryError, InvalidInputError, NotFoundError
from ferry.peer.routes import NoBody, Route, RouteTable

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)

CHUNK = 1 << 20


async def _no_stream() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


@dataclass
class Call(Generic[Req]):
    """One request as a handler sees it."""

    caller: CertInfo
    body: Req
    params: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] = field(default_factory=_no_stream)

    def require_host(self) -> str:
        """The caller's host name; AuthError unless it holds a host certificate."""
        if self.caller.role is not Role.HOST:
            raise AuthError(f"only a ferry host may call this; {self.caller.common_name!r} "
                            "is not one")  # fmt: skip
        return self.caller.common_name


Handler = Callable[[Call[Any]], Awaitable[BaseModel]]
# Refuses a caller (AuthError) from its certificate and the path parameters,
# before the body is read or validated.
Guard = Callable[[CertInfo, dict[str, str]], None]


def _compact_json(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"))


def error_payload(exc: FerryError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": exc.message}}


class PeerServer:
    """Dispatches peer requests to the handlers host services registered."""

    def __init__(self) -> None:
        self._table = RouteTable()
        self._handlers: dict[int, Handler] = {}
        self._guards: dict[int, Guard] = {}

    def handle(
        self,
        route: Route[Req, Rep],
        handler: Callable[[Call[Req]], Awaitable[Rep]],
        *,
        guard: Guard | None = None,
    ) -> None:
        """Answer ``route`` with ``handler``; ``guard`` vets the caller before the body."""
        if id(route) in self._handlers:
            raise ValueError(f"{route.method} {route.path} has a handler already")
        self._table.add(route)
        self._handlers[id(route)] = handler
        if guard is not None:
            self._guards[id(route)] = guard

    @property
    def routes(self) -> list[Route[Any, Any]]:
        return list(self._table.routes)

    async def dispatch(
        self,
        caller: CertInfo,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: bytes = b"",
        stream: AsyncIterable[bytes] | None = None,
    ) -> tuple[int, Any]:
        """Answer one request: (HTTP status, JSON-able payload). Never raises FerryError."""
        try:
            found = self._table.find(method, path)
            if found is None:
                raise NotFoundError(f"no peer endpoint {method} {path}")
            route, params = found
            log_context.bind(peer=caller.common_name)  # this request's task only
            guard = self._guards.get(id(route))
            if guard is not None:
                guard(caller, params)
            if route.upload:
                model: BaseModel = route.request()
            elif route.request is NoBody:
                model = NoBody()
            else:
                try:
                    model = route.request.model_validate_json(body or b"{}")
                except ValidationError as exc:
                    raise InvalidInputError(
                        f"invalid request: {first_error(exc, whole='body')}"
                    ) from exc
            call: Call[Any] = Call(caller, model, params, dict(query or {}))
            if stream is not None:
                call.stream = aiter(stream)
            reply = await self._handlers[id(route)](call)
            return route.status, reply.model_dump(mode="json")
        except FerryError as exc:
            return exc.http_status, error_payload(exc)

    def aiohttp_routes(self, caller_of: Callable[[web.Request], CertInfo]) -> list[web.RouteDef]:
        """The HTTPS edge: one aiohttp route per peer route, all through dispatch."""

        async def serve(request: web.Request) -> web.Response:
            caller = caller_of(request)
            upload = request.content.iter_chunked(CHUNK) if request.can_read_body else None
            found = self._table.find(request.method, request.path)
            streams = found is not None and found[0].upload
            status, payload = await self.dispatch(
                caller,
                request.method,
                request.path,
                query=dict(request.query),
                body=b"" if streams else await request.read(),
                stream=upload if streams else None,
            )
            # Compact, as pydantic writes JSON: the bytes match the admin API's.
            return web.json_response(payload, status=status, dumps=_compact_json)

        return [web.route(route.method, route.path, serve) for route in self._table.routes]
