"""The certificate routes: this host's certificate (and its renewal), the deny-list.

Admin certificate only (the edge's guard refuses host certificates off
``/v1/peer/...``)::

    GET  /v1/host/certificate   -> CertificateView (the certificate the agent presents)
    POST /v1/host/certificate   RenewRequest -> RenewView (install a renewed pair in place)
    GET  /v1/revocations        -> RevocationsView
    POST /v1/revocations        RevocationsView -> RevocationsView (merged; ``added`` new)

The work is :class:`ferry.host.certificates.HostCertificates` and
:class:`ferry.host.revocations.Revocations`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ferry.adapters.pki import CertInfo
from ferry.adapters.pki.revocation import Revoked
from ferry.api.edge import VET_CALLER, json_reply, read_body
from ferry.host.certificates import HostCertificates


class CertificateView(BaseModel):
    subject: str
    common_name: str
    thumbprint: str
    serial: str
    not_after: str
    dns_names: list[str]
    ips: list[str]

    @classmethod
    def of(cls, info: CertInfo) -> CertificateView:
        return cls(subject=info.subject, common_name=info.common_name,
                   thumbprint=info.thumbprint, serial=info.serial,
                   not_after=info.not_after.isoformat(), dns_names=list(info.dns_names),
                   ips=list(info.ips))  # fmt: skip


class RenewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cert_pem: str = Field(max_length=64 * 1024)
    key_pem: str = Field(max_length=64 * 1024)
    force: bool = False


class PartnerView(BaseModel):
    host: str
    pins_updated: int | None
    error: str | None = None


class RenewView(BaseModel):
    host: str
    old: CertificateView
    new: CertificateView
    partners: list[PartnerView]


class RevokedView(BaseModel):
    model_config = ConfigDict(extra="forbid")

    serial: str = Field(min_length=1, max_length=64)
    host: str = Field(default="", max_length=253)
    thumbprint: str = Field(default="", max_length=64)
    reason: str = Field(default="", max_length=200)
    revoked_at: float = 0.0


class RevocationsView(BaseModel):
    model_config = ConfigDict(extra="forbid")

    revoked: list[RevokedView] = Field(max_length=100_000)
    added: list[RevokedView] = []


def open_connections(runner: web.AppRunner) -> Callable[[], list[asyncio.BaseTransport | None]]:
    """The transports of the runner's open connections (what a revocation cuts)."""

    def connections() -> list[asyncio.BaseTransport | None]:
        server = runner.server
        return [] if server is None else [handler.transport for handler in server.connections]

    return connections


def _views(entries: list[Revoked]) -> list[RevokedView]:
    return [RevokedView(serial=e.serial, host=e.host, thumbprint=e.thumbprint, reason=e.reason,
                        revoked_at=e.revoked_at) for e in entries]  # fmt: skip


class PkiRoutes:
    def __init__(self, certificates: HostCertificates) -> None:
        self.certificates = certificates
        self.revocations = certificates.revocations

    @classmethod
    def install(cls, app: web.Application, certificates: HostCertificates) -> None:
        """The routes, and the edge's check of every caller (revoked, renewed)."""
        app[VET_CALLER] = certificates.vet
        app.add_routes(cls(certificates).routes())

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/host/certificate", self.show),
            web.post("/v1/host/certificate", self.renew),
            web.get("/v1/revocations", self.list_revoked),
            web.post("/v1/revocations", self.revoke),
        ]

    async def show(self, request: web.Request) -> web.Response:
        return json_reply(CertificateView.of(self.certificates.current()))

    async def renew(self, request: web.Request) -> web.Response:
        body = await read_body(request, RenewRequest)
        done = await self.certificates.renew(body.cert_pem.encode(), body.key_pem.encode(),
                                             force=body.force)  # fmt: skip
        return json_reply(RenewView(
            host=done.host, old=CertificateView.of(done.old), new=CertificateView.of(done.new),
            partners=[PartnerView(host=p.host, pins_updated=p.pins_updated, error=p.error)
                      for p in done.partners]))  # fmt: skip

    async def list_revoked(self, request: web.Request) -> web.Response:
        return json_reply(RevocationsView(revoked=_views(self.revocations.list.entries)))

    async def revoke(self, request: web.Request) -> web.Response:
        body = await read_body(request, RevocationsView)
        added = self.revocations.merge([Revoked(e.serial, e.host, e.thumbprint, e.reason,
                                                e.revoked_at) for e in body.revoked])  # fmt: skip
        return json_reply(RevocationsView(revoked=_views(self.revocations.list.entries),
                                          added=_views(added)))  # fmt: skip
