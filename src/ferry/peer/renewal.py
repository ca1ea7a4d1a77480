"""A host tells its partners its renewed certificate (``ferry pki renew``).

``POST /v1/peer/renewals`` (a host certificate: the caller's *old* one, the
certificate its partners pin): the body names the old and the new
thumbprint; the partner rewrites the pins it keeps for the caller (its
replication relationships, extensions and failover partners) and accepts
both for a grace period (:mod:`ferry.core.renewal`). It only ever concerns
the caller's own certificate: ``old`` must be the thumbprint the caller
presents, and only pins of the caller's name change.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ferry.peer.routes import Route


class RenewalNotice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    old_thumbprint: str
    new_thumbprint: str


class RenewalAck(BaseModel):
    host: str
    pins_updated: int


RENEWAL = Route("POST", "/v1/peer/renewals", RenewalNotice, RenewalAck)
