"""Peer payloads and routes of a live migration (the source calls the destination).

Wire format, in call order (the source's host certificate is required; its DN
becomes the destination QEMU's ``tls-authz`` identity)::

    POST /v1/peer/migrations               PrepareRequest -> PrepareReply (201)
    PUT  /v1/peer/migrations/{id}/files/{file}  raw bytes of kernel|initrd -> FileReceived
    POST /v1/peer/migrations/{id}/launch   -> LaunchReply   (QEMU waits for the streams)
    POST /v1/peer/migrations/{id}/finish   -> IncomingOutcome (switch-over: resume there)
    POST /v1/peer/migrations/{id}/abort    -> IncomingOutcome
    GET  /v1/peer/migrations/{id}          -> IncomingOutcome

``finish`` is idempotent: a repeated call reports the outcome. Only the host
that prepared a move may launch, finish, abort or ask about it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ferry.core.migration import IncomingState, Storage
from ferry.core.spec import VmSpec
from ferry.peer.routes import NoBody, Route, Upload


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PrepareRequest(_Model):
    job_id: str
    spec: VmSpec
    storage: Storage
    # Per disk: (volume name, path inside it) when the disk lies on a volume.
    disk_volumes: list[tuple[str, str] | None] = []


class PrepareReply(_Model):
    storage: Storage


class FileReceived(_Model):
    received: str


class NbdEndpoint(_Model):
    host: str
    port: int


class LaunchReply(_Model):
    uri: str
    nbd: NbdEndpoint | None = None
    tls: bool


class IncomingOutcome(_Model):
    state: IncomingState
    error: str | None = None


PREPARE = Route("POST", "/v1/peer/migrations", PrepareRequest, PrepareReply, status=201)
FILE = Route("PUT", "/v1/peer/migrations/{id}/files/{file}", Upload, FileReceived)
LAUNCH = Route("POST", "/v1/peer/migrations/{id}/launch", NoBody, LaunchReply)
FINISH = Route("POST", "/v1/peer/migrations/{id}/finish", NoBody, IncomingOutcome)
ABORT = Route("POST", "/v1/peer/migrations/{id}/abort", NoBody, IncomingOutcome)
STATUS = Route("GET", "/v1/peer/migrations/{id}", NoBody, IncomingOutcome)
