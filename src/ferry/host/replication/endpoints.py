"""Replication's peer endpoints: each route of :mod:`ferry.peer.replication` to its service.

The handlers only unwrap a :class:`~ferry.peer.server.Call` (path and query
parameters, the body as its model, an upload as an async byte iterator) and
call the service that owns the object. Every endpoint about one replica VM
is guarded: the caller must be that relationship's pinned primary, checked
from the certificate and the path before the body is read
(:meth:`ReplicaStore.partner_relationship`), a change also from a host of
a clustered primary's cluster (:meth:`ReplicaStore.changer_relationship`;
the body then says whether it may); the takeover is authorised by
:func:`ferry.host.replication.handover.adopt` from its body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ferry import __version__
from ferry.adapters.pki import CertInfo, Role
from ferry.core.replica_server import Admission
from ferry.errors import AuthError, InvalidInputError, NotFoundError
from ferry.host.replication.broker import ReplicaBroker
from ferry.host.replication.receiver import ReplicaStore
from ferry.host.replication.replica_move import ReplicaMover
from ferry.peer.replication import (
    ADMISSION,
    FILE,
    HASHES,
    HELLO,
    LOCATE,
    MOVE_REPLICA,
    OFFER,
    POINT,
    POINTS,
    REMOVE,
    REPLICA,
    TAKE_OVER,
    UPDATE,
    BlockHashes,
    BrokerOwner,
    FileReceived,
    Hello,
    Offer,
    PointLinked,
    PointList,
    PrimaryStatus,
    ReplicaChanges,
    ReplicaMoved,
    ReplicaMoveRequest,
    ReplicaRemoved,
    ReplicaState,
    Takeover,
)
from ferry.peer.routes import NoBody, Upload
from ferry.peer.server import Call, PeerServer

MIN_BLOCK = 64 * 1024
MAX_BLOCK = 64 << 20


class ReplicationEndpoints:
    """The handlers of this host's replication peer endpoints."""

    def __init__(self, store: ReplicaStore, *, mover: ReplicaMover,
                 adopt: Callable[[CertInfo, Takeover], Awaitable[PrimaryStatus]],
                 broker: ReplicaBroker | None = None) -> None:  # fmt: skip
        """``adopt``: the primary side's takeover (``ReplicationService.adopt``);
        ``broker``: this node's cluster as a replica target (locating, publishing)."""
        self.store = store
        self.broker = broker
        self.mover = mover
        self.adopt = adopt
        self.config = store.config

    def register(self, server: PeerServer) -> None:
        server.handle(HELLO, self.hello)
        server.handle(ADMISSION, self.admission)
        server.handle(OFFER, self.offer)
        server.handle(TAKE_OVER, self.take_over)
        partner = self._partner  # about one replica VM: its pinned primary only
        server.handle(REPLICA, self.replica, guard=partner)
        server.handle(UPDATE, self.update, guard=self._changer)
        server.handle(REMOVE, self.remove, guard=partner)
        server.handle(POINT, self.point, guard=partner)
        server.handle(POINTS, self.points, guard=partner)
        server.handle(FILE, self.file, guard=partner)
        server.handle(HASHES, self.hashes, guard=partner)
        server.handle(MOVE_REPLICA, self.move, guard=partner)
        server.handle(LOCATE, self.locate)

    async def _published(self, uuid: str, cluster: str = "") -> None:
        """A brokered replica changed here: the cluster's record follows before the reply."""
        if self.broker is not None and (cluster or self.broker.is_brokered(uuid)):
            async with self.store.lock(uuid):  # one at a time with background retention's
                await self.broker.publish(uuid, cluster=cluster or None)

    async def locate(self, call: Call[NoBody]) -> BrokerOwner:
        if self.broker is None:
            raise NotFoundError(f"host {self.config.name!r} is in no cluster")
        uuid = call.params["uuid"]
        async with self.store.lock(uuid):
            return await self.broker.locate(call.caller, call.params["cluster"], uuid)

    def _partner(self, caller: CertInfo, params: dict[str, str]) -> None:
        self.store.partner_relationship(caller, params["uuid"])

    def _changer(self, caller: CertInfo, params: dict[str, str]) -> None:
        self.store.changer_relationship(caller, params["uuid"])

    async def hello(self, call: Call[NoBody]) -> Hello:
        caller = call.caller
        return Hello(name=self.config.name, version=__version__,
                     functional_level=self.config.functional_level, caller=caller.common_name,
                     caller_role=caller.role.value if caller.role else "none",
                     cpu_models=self.store.cpu.models,
                     networks=tuple(sorted(self.store.networks().all())))  # fmt: skip

    async def admission(self, call: Call[NoBody]) -> Admission:
        if call.caller.role is not Role.HOST:
            raise AuthError("only a ferry host can be admitted as a primary")
        return self.store.server.admit(call.caller.common_name)

    async def offer(self, call: Call[Offer]) -> ReplicaState:
        state = await self.store.accept(call.caller, call.body)
        await self._published(call.body.spec.uuid)
        return state

    async def take_over(self, call: Call[Takeover]) -> PrimaryStatus:
        return await self.adopt(call.caller, call.body)

    # -- one replica VM (guarded: its pinned primary only) --------------------------------

    async def replica(self, call: Call[NoBody]) -> ReplicaState:
        return await self.store.checked_state(call.params["uuid"])

    async def update(self, call: Call[ReplicaChanges]) -> ReplicaState:
        state = self.store.update(call.caller, call.params["uuid"], call.body)
        await self._published(call.params["uuid"])
        return state

    async def remove(self, call: Call[NoBody]) -> ReplicaRemoved:
        uuid = call.params["uuid"]
        rel = self.store.catalog.relationship(uuid)
        removed = await self.store.remove(call.caller, uuid)
        await self._published(uuid, rel.broker if rel is not None else "")
        return removed

    async def point(self, call: Call[Upload]) -> PointLinked:
        try:
            point_id = int(call.params["id"])
            point_time = float(call.query.get("time", "0"))
        except ValueError:
            raise InvalidInputError("point id and time must be numbers") from None
        frozen = call.query.get("app_consistent") == "1"
        linked = await self.store.receive(call.caller, call.params["uuid"], point_id,
                                          point_time, call.stream,
                                          app_consistent=frozen)  # fmt: skip
        await self._published(call.params["uuid"])
        return linked

    async def points(self, call: Call[NoBody]) -> PointList:
        return self.store.point_views(call.params["uuid"])

    async def file(self, call: Call[Upload]) -> FileReceived:
        received = await self.store.receive_file(call.caller, call.params["uuid"],
                                                 call.params["kind"], call.stream)  # fmt: skip
        await self._published(call.params["uuid"])
        return received

    async def hashes(self, call: Call[NoBody]) -> BlockHashes:
        try:
            block_size = int(call.query.get("block_size", str(1 << 20)))
        except ValueError:
            raise InvalidInputError("block_size must be a number") from None
        if block_size < MIN_BLOCK or block_size > MAX_BLOCK or block_size % MIN_BLOCK:
            raise InvalidInputError("block_size must be a multiple of 64 KiB up to 64 MiB")
        disks = await self.store.block_hashes(call.caller, call.params["uuid"], block_size)
        return BlockHashes(disks=disks)

    async def move(self, call: Call[ReplicaMoveRequest]) -> ReplicaMoved:
        body = call.body
        return await self.mover.move(call.caller, call.params["uuid"], body.to, body.to_url)
