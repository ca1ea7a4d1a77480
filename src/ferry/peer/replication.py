"""Peer payloads and routes of replication (a primary, or a replica host, calls another).

Wire format. Every call needs a host certificate of the same CA; the
receiving side then authorises the caller *for the object* (see
:mod:`ferry.core.replication.authority`)::

    GET    /v1/peer/hello                    -> Hello (who answers, who asked)
    GET    /v1/peer/replica-server/admission -> Admission | 403 (caller not admitted)
    POST   /v1/peer/replicas  Offer          -> ReplicaState (201)
    GET    /v1/peer/replicas/{uuid}          -> ReplicaState
    PATCH  /v1/peer/replicas/{uuid}  ReplicaChanges -> ReplicaState
    DELETE /v1/peer/replicas/{uuid}          -> ReplicaRemoved (the replica VM stays, off)
    PUT    /v1/peer/replicas/{uuid}/points/{id}?time=T  raw delta stream -> PointLinked
    GET    /v1/peer/replicas/{uuid}/points   -> [PointView]
    PUT    /v1/peer/replicas/{uuid}/files/{kernel|initrd}  raw bytes -> FileReceived
    GET    /v1/peer/replicas/{uuid}/hashes?block_size=N -> BlockHashes
    POST   /v1/peer/replicas/{uuid}/move  ReplicaMoveRequest -> ReplicaMoved
    POST   /v1/peer/replications  Takeover -> PrimaryStatus (201)
    GET    /v1/peer/broker/{cluster}/replicas/{uuid} -> BrokerOwner (the replica broker:
           which node of the cluster holds the replica VM now; any node answers)

Who may call what:

* ``hello`` and an ``offer``: any ferry host (an offer also needs the replica
  server to admit the caller; a resent offer only from the pinned primary);
* everything under ``/replicas/{uuid}``: only the relationship's pinned
  partner, the primary host by name and certificate thumbprint; for a
  clustered VM a ``PATCH`` also from a host of the primary's cluster (as
  the primary last told the replica in ``cluster_hosts``), which may only
  name itself, with its own certificate, as the new primary;
* ``/replications`` (the takeover after a live move): only the host the VM
  has just moved here from, i.e. the source of this host's finished incoming
  move of that VM.

The point stream (``PUT .../points/{id}``) is :mod:`ferry.core.delta_stream`;
``time`` is the point's Unix time (``repr`` of a float). A resend of a linked
point is read to its end and answered with ``linked: false``. ``block_size``
is a multiple of 64 KiB up to 64 MiB; the hashes are SHA-256 per block of
the latest point, one list per disk.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, RootModel

from ferry.core.cpu_models import CpuModel
from ferry.core.relationship import InitialMethod, Relationship
from ferry.core.replica_server import Admission
from ferry.core.replication import ClusterHost, CycleRecord
from ferry.core.spec import NicSpec, VmSpec
from ferry.peer.routes import NoBody, Route, Upload


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Hello(_Model):
    name: str
    version: str
    functional_level: int
    caller: str
    caller_role: str
    # The CPU models this host runs (core/cpu_models.py); empty from an older host.
    cpu_models: tuple[CpuModel, ...] = ()
    # The names of this host's networks (copy-roles' report); None from an older host.
    networks: tuple[str, ...] | None = None


class Offer(_Model):
    """A VM offered for replication, with the relationship's terms."""

    spec: VmSpec
    frequency_s: int
    recovery_points: int
    functional_level: int  # the sender's: the replica must run it or newer
    initial: InitialMethod = InitialMethod.NETWORK
    primary_url: str = ""
    # An extended replica: the VM's own primary (the sender is a replica host).
    origin: str = ""
    origin_url: str = ""
    # The VM's network -> the receiver's network a failover puts its NICs on
    # (a network not named keeps its name); refused if the receiver lacks one.
    network_map: dict[str, str] = {}
    # The replica broker (``--replica cluster:C``): the cluster admits the primary and
    # holds the replica VM, not the node that answered.
    cluster: str = ""


class BrokerOwner(_Model):
    """The node of a replica cluster that holds a replica VM now, and where it answers."""

    node: str
    url: str


class ReplicaState(_Model):
    """The replica host's view of its copy of a VM."""

    vm: str
    host: str
    version: str
    functional_level: int
    primary: str
    origin: str = ""
    latest_point: int | None
    latest_time: float | None
    points: int
    recovery_points: int
    bytes: int
    # A clustered VM: the cluster and hosts the replica accepts a new primary from.
    cluster: str = ""
    cluster_hosts: list[ClusterHost] = Field(default_factory=list)
    # Networks the replica VM's NICs are on that this host lacks now (a
    # failover could not start it; a planned failover checks before it begins).
    missing_networks: list[str] = Field(default_factory=list)
    # Networks it has whose bridge is gone (asked through REPLICA only: the
    # links are looked at); "NETWORK (bridge BR)" each.
    missing_bridges: list[str] = Field(default_factory=list)


class ReplicaChanges(_Model):
    """What the partner changes; None leaves a field as it is.

    ``primary`` with ``thumbprint`` (and ``primary_url``) hands the replica to
    another primary host (the VM moved, or the replica VM did); ``origin``
    tells an extended replica that the VM moved between primaries.
    ``cluster`` with ``cluster_hosts``: the primary's cluster and its hosts
    (name, certificate thumbprint), any of which may later claim the primary's
    place; an empty ``cluster`` makes the VM standalone again.
    """

    frequency_s: int | None = None
    recovery_points: int | None = None
    primary: str | None = None
    thumbprint: str | None = None
    primary_url: str | None = None
    origin: str | None = None
    origin_url: str | None = None
    cluster: str | None = None
    cluster_hosts: list[ClusterHost] | None = None
    # A new network map, with the VM's NICs as the primary has them (the
    # replica VM's spec holds them mapped): its failovers use the new map.
    network_map: dict[str, str] | None = None
    nics: list[NicSpec] | None = None


class ReplicaRemoved(_Model):
    vm: str
    kept_replica_vm: bool


class PointLinked(ReplicaState):
    point: int
    linked: bool  # False: a resend of a point linked before


class PointView(_Model):
    """A recovery point as ``replication points`` lists it.

    ``consistent`` (the field since the first release) means crash-consistent:
    every disk cut at one instant, verified whole; ``crash_consistent`` says
    the same under its own name. ``app_consistent``: cut while the guest's
    file systems were frozen through its guest agent (``--app-consistent-every``).
    """

    id: int
    time: float
    size: int
    consistent: bool
    crash_consistent: bool = True
    app_consistent: bool = False


class PointList(RootModel[list[PointView]]):
    pass


class FileReceived(_Model):
    received: str


class BlockHashes(_Model):
    disks: list[list[str]]


class ReplicaMoveRequest(_Model):
    to: str
    to_url: str


class ReplicaMoved(_Model):
    vm: str
    host: str
    thumbprint: str  # the new replica host's: the primary pins it
    points: int
    bytes: int


class Takeover(Relationship):
    """The relationship as the old primary kept it, with its cycle history.

    The history travels so that status, health and statistics carry on
    across the move.
    """

    cycles: list[CycleRecord] = Field(default_factory=list)


class PrimaryStatus(BaseModel):
    """``replication status`` of the new primary; only these fields are read."""

    model_config = ConfigDict(extra="allow", frozen=True)

    vm: str
    role: str
    state: str


HELLO = Route("GET", "/v1/peer/hello", NoBody, Hello)
ADMISSION = Route("GET", "/v1/peer/replica-server/admission", NoBody, Admission)
OFFER = Route("POST", "/v1/peer/replicas", Offer, ReplicaState, status=201)
REPLICA = Route("GET", "/v1/peer/replicas/{uuid}", NoBody, ReplicaState)
UPDATE = Route("PATCH", "/v1/peer/replicas/{uuid}", ReplicaChanges, ReplicaState)
REMOVE = Route("DELETE", "/v1/peer/replicas/{uuid}", NoBody, ReplicaRemoved)
POINT = Route("PUT", "/v1/peer/replicas/{uuid}/points/{id}", Upload, PointLinked)
POINTS = Route("GET", "/v1/peer/replicas/{uuid}/points", NoBody, PointList)
FILE = Route("PUT", "/v1/peer/replicas/{uuid}/files/{kind}", Upload, FileReceived)
HASHES = Route("GET", "/v1/peer/replicas/{uuid}/hashes", NoBody, BlockHashes)
MOVE_REPLICA = Route("POST", "/v1/peer/replicas/{uuid}/move", ReplicaMoveRequest, ReplicaMoved)
TAKE_OVER = Route("POST", "/v1/peer/replications", Takeover, PrimaryStatus, status=201)
LOCATE = Route("GET", "/v1/peer/broker/{cluster}/replicas/{uuid}", NoBody, BrokerOwner)
