"""The peer endpoints as data: one :class:`Route` per ``/v1/peer/...`` endpoint.

A route names its method, its path template, the model of its JSON body (or
:data:`UPLOAD` for a raw byte stream, or None for no body) and the model of
its reply. The client builds requests from routes and validates replies with
them; the server matches requests against them and validates bodies with
them, so both ends read the one table. The payload models live in
:mod:`ferry.peer.models`, grouped by capability.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote, unquote

from pydantic import BaseModel

from ferry.errors import InvalidInputError

Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)

_PARAM = re.compile(r"\{(\w+)\}")


class Upload(BaseModel):
    """Marker body model: the request body is a raw byte stream, not JSON."""


class NoBody(BaseModel):
    """Marker body model: the request has no body."""


@dataclass(frozen=True, eq=False)
class Route(Generic[Req, Rep]):
    """One peer endpoint. ``status`` is the HTTP status of a successful reply."""

    method: str
    path: str
    request: type[Req]
    reply: type[Rep]
    status: int = 200
    _pattern: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        parts = _PARAM.split(self.path)  # literal, name, literal, name, ...
        pattern = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)"
                          for i, part in enumerate(parts))  # fmt: skip
        object.__setattr__(self, "_pattern", re.compile(f"^{pattern}$"))

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(_PARAM.findall(self.path))

    @property
    def upload(self) -> bool:
        return self.request is Upload

    def url(self, **params: str) -> str:
        """The path with ``params`` filled in (each quoted)."""
        missing = set(self.params) - set(params)
        if missing:
            raise InvalidInputError(f"route {self.path} needs {sorted(missing)}")
        return _PARAM.sub(lambda m: quote(str(params[m.group(1)]), safe=""), self.path)

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if method != self.method:
            return None
        found = self._pattern.match(path)
        return None if found is None else {k: unquote(v) for k, v in found.groupdict().items()}

    def parse_reply(self, payload: Any) -> Rep:
        return self.reply.model_validate(payload)


class RouteTable:
    """The set of routes a server answers; registration order is match order."""

    def __init__(self) -> None:
        self.routes: list[Route[Any, Any]] = []

    def add(self, route: Route[Req, Rep]) -> Route[Req, Rep]:
        self.routes.append(route)
        return route

    def find(self, method: str, path: str) -> tuple[Route[Any, Any], dict[str, str]] | None:
        for route in self.routes:
            params = route.match(method, path)
            if params is not None:
                return route, params
        return None
