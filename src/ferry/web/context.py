"""The application's shared objects, as typed aiohttp keys, and helpers pages use to answer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from ferry.errors import FerryError

if TYPE_CHECKING:
    from ferry.web.app import Origin
    from ferry.web.operations import Operations
    from ferry.web.render import Renderer
    from ferry.web.sampler import LagSampler
    from ferry.web.session import Session, Sessions

OPS: web.AppKey[Operations] = web.AppKey("ops")
SESSIONS: web.AppKey[Sessions] = web.AppKey("sessions")
ORIGIN: web.AppKey[Origin] = web.AppKey("origin")
RENDERER: web.AppKey[Renderer] = web.AppKey("renderer")
SAMPLER: web.AppKey[LagSampler] = web.AppKey("sampler")
SESSION: web.RequestKey[Session] = web.RequestKey("session")  # the caller's


def ops(request: web.Request) -> Operations:
    return request.app[OPS]


def sampler(request: web.Request) -> LagSampler:
    return request.app[SAMPLER]


def session(request: web.Request) -> Session:
    return request[SESSION]


def page(
    request: web.Request, template: str, *, http_status: int = 200, **data: Any
) -> web.Response:
    """A whole page: ``template`` with ``data`` and what every page shows."""
    html = request.app[RENDERER].render(template, csrf=session(request).csrf,
                                        path=request.path, **data)  # fmt: skip
    return web.Response(text=html, status=http_status, content_type="text/html")


def fragment(request: web.Request, template: str, **data: Any) -> str:
    return request.app[RENDERER].render(template, csrf=session(request).csrf, **data)


def is_htmx(request: web.Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def outcome(request: web.Request, *, ok: str | None = None, error: FerryError | None = None,
            back: str = "/", job: dict[str, Any] | None = None) -> web.Response:  # fmt: skip
    """An action's one line: into ``#action-result`` for htmx, else a small page.

    htmx 2 swaps only 2xx answers, so a refusal is a 200 carrying
    ``role="alert"``; without htmx the page answers 409 with the same line.
    ``job``: the job the action started, whose progress then follows the line.
    """
    data = {"ok": ok, "error": None if error is None else str(error), "back": back, "job": job}
    if is_htmx(request):
        return web.Response(text=fragment(request, "_outcome.html", **data),
                            content_type="text/html")  # fmt: skip
    return page(request, "outcome.html", http_status=200 if error is None else 409,
                title="Refused" if error else "Done", **data)  # fmt: skip
