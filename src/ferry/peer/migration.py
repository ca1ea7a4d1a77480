"""Peer payloads and routes of a live migration (the source calls the destination).

Wire format, in call order (the source's host certificate is required; its DN
becomes the destination QEMU's ``tls-authz`` identity)::

    POST /v1/peer/migrations/check         CheckRequest -> CheckReply (before any job:
                                           refused with one line if a network is missing
                                           or the host cannot run the VM's CPU model)
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


class CheckRequest(_Model):
    """Could this VM come here? Asked before the move's job exists.

    ``network_map``: the VM's network -> this host's network standing for it
    (``--network-map``); a network it does not name keeps its name.
    """

    spec: VmSpec
    network_map: dict[str, str] = {}


class CheckReply(_Model):
    networks: list[str]  # the destination's networks the VM will be on


class PrepareRequest(_Model):
    job_id: str
    spec: VmSpec
    storage: Storage
    # Per disk: (volume name, path inside it) when the disk lies on a volume.
    disk_volumes: list[tuple[str, str] | None] = []
    # A copy into another cluster: the destination's volume whose ``<uuid>/`` dir holds
    # the copied disks, kernel and initrd (so every node there can start the VM).
    into_volume: str | None = None
    postcopy: bool = False  # the source may switch to post-copy (both QEMUs need it)


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
    # The destination's clock when it answered (seconds since the epoch): the
    # source estimates the clock offset from it (ferry.core.pause).
    clock: float | None = None
    # Once resumed, on the destination's clock: its incoming side settled
    # (loaded), and its QEMU's RESUME event (vCPUs running).
    loaded_at: float | None = None
    resumed_at: float | None = None
    loaded_status: str | None = None  # 'completed', or 'postcopy-active' (post-copy)


CHECK = Route("POST", "/v1/peer/migrations/check", CheckRequest, CheckReply)
PREPARE = Route("POST", "/v1/peer/migrations", PrepareRequest, PrepareReply, status=201)
FILE = Route("PUT", "/v1/peer/migrations/{id}/files/{file}", Upload, FileReceived)
LAUNCH = Route("POST", "/v1/peer/migrations/{id}/launch", NoBody, LaunchReply)
FINISH = Route("POST", "/v1/peer/migrations/{id}/finish", NoBody, IncomingOutcome)
ABORT = Route("POST", "/v1/peer/migrations/{id}/abort", NoBody, IncomingOutcome)
STATUS = Route("GET", "/v1/peer/migrations/{id}", NoBody, IncomingOutcome)
