"""The HTTP edge of the agent: who calls (certificate roles), bodies in, replies and errors out.

The verified client certificate of each request decides its role: an *admin*
certificate may call everything; a *host* certificate of the same CA (a peer)
may only call ``/v1/peer/...``; anything else is cut off in the TLS handshake
(no, foreign or expired certificate) or answered 403, and so is a revoked
certificate (:data:`VET_CALLER`, which also closes its connection). Every error leaves as one JSON
line ``{"error": {"code", "message"}}``; an unexpected exception is logged
with its traceback here and answered as an internal error.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from ferry.adapters.pki import CertInfo, Role, cert_info_from_der
from ferry.core.validation import first_error
from ferry.errors import AuthError, FerryError, InvalidInputError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The agent's check of every caller beyond the CA (ferry.host.certificates):
# AuthError for a revoked certificate, else the caller as the rules see it.
VET_CALLER: web.AppKey[Callable[[CertInfo], CertInfo]] = web.AppKey("ferry_vet_caller")


def json_reply(model: BaseModel | list[Any] | dict[str, Any], status: int = 200) -> web.Response:
    if isinstance(model, BaseModel):
        body = model.model_dump_json()
    else:
        body = web.json_response(model).text or "null"
    return web.Response(text=body, status=status, content_type="application/json")


def error_reply(exc: FerryError) -> web.Response:
    payload = {"error": {"code": exc.code, "message": exc.message}}
    return web.json_response(payload, status=exc.http_status)


def caller_of(request: web.Request) -> CertInfo:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise AuthError("a client certificate is required")
    return cert_info_from_der(der)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authorise by certificate role, and turn every error into one JSON line."""
    try:
        caller = caller_of(request)
        vet = request.config_dict.get(VET_CALLER)
        if vet is not None:
            try:
                caller = vet(caller)
            except AuthError as exc:  # revoked: refused, and the connection closed
                reply = error_reply(exc)
                reply.force_close()
                return reply
        is_peer_path = request.path.startswith("/v1/peer/")
        if caller.role is Role.HOST and not is_peer_path:
            raise AuthError(
                f"host certificate {caller.common_name!r} may only call peer endpoints; "
                "use an admin certificate"
            )
        if caller.role not in (Role.ADMIN, Role.HOST):
            raise AuthError(f"certificate {caller.subject!r} is neither a ferry admin nor a host")
        request["caller"] = caller
        return await handler(request)
    except FerryError as exc:
        return error_reply(exc)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_reply(FerryError(f"internal error in the agent: {type(exc).__name__}: {exc}"))


async def read_body(request: web.Request, model: type[M]) -> M:
    try:
        raw = await request.read()
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise InvalidInputError(f"invalid request: {first_error(exc, whole='body')}") from exc
