"""This host as a node of one cluster: its store, its lease, and the records it keeps.

A :class:`Membership` is what other cluster services build on (clustered VMs,
fencing, HA): the store and key layout, the cluster and node names, the
node's lease id, whether this node leads, the cluster's functional level, the
node views and the events log. It is made by
:class:`ferry.host.cluster.service.ClusterService` when the host joins a
cluster or reconnects at agent start, and handed on through a
:class:`ClusterContext` (whose ``membership`` is None while the host is in
no cluster).

The lease is owned here: :meth:`Membership.regrant` replaces a lost one and
puts ``alive/<node>`` again, and whoever keeps the lease alive (the fencing
module's LeaseKeeper) reads :attr:`Membership.lease` and calls
:meth:`Membership.on_lease_lost`. Listeners learn of a new lease through
:attr:`Membership.lease_listeners`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.nodes import AliveRecord, MemberRecord, NodeView, node_views
from ferry.core.cluster.records import ClusterMeta, EventKind, EventRecord
from ferry.core.cluster.store import ClusterStore, Compare, Delete, Put
from ferry.core.cluster.timing import ClusterTimings
from ferry.errors import FerryError

log = logging.getLogger(__name__)

# How many times record_event retries when another node took the event key first.
_EVENT_ATTEMPTS = 8
# The events log keeps this many (the leader prunes older ones).
EVENTS_KEPT = 1000


async def append_event(store: ClusterStore, keys: ClusterKeys, record: EventRecord) -> None:
    """Append ``record`` to the events log of ``keys``' cluster (see
    :meth:`Membership.record_event`); also how a move into another cluster writes there."""
    for _ in range(_EVENT_ATTEMPTS):
        key = keys.event(await store.revision() + 1)
        result = await store.txn([Compare.absent(key)], [Put(key, record.to_json())])
        if result.succeeded:
            return
    raise FerryError(f"cannot record event {record.kind} in cluster {keys.cluster}: the store "
                     "kept moving under it")  # fmt: skip


class Membership:
    """One host's place in one cluster; see the module docstring."""

    def __init__(
        self,
        store: ClusterStore,
        *,
        cluster: str,
        node: str,
        lease: int,
        timings: ClusterTimings,
        member: MemberRecord,
        meta: ClusterMeta,
        memory_free: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.keys = ClusterKeys(cluster)
        self.cluster = cluster
        self.node = node
        self.lease = lease
        self.timings = timings
        self.member = member
        self._meta = meta
        self._leader = False
        self.memory_free = memory_free
        self.clock = clock
        self.log = log.getChild(f"{cluster}.{node}")
        # Called with the new lease id after a regrant (the leader key and alive
        # record went with the old one).
        self.lease_listeners: list[Callable[[int], None]] = []

    # -- what others read -------------------------------------------------------------

    @property
    def functional_level(self) -> int:
        """The cluster's functional level (``meta``), as last read."""
        return self._meta.functional_level

    @property
    def meta(self) -> ClusterMeta:
        return self._meta

    def is_leader(self) -> bool:
        """Whether this node held the leader key at the election's last look."""
        return self._leader

    def set_leader(self, leading: bool) -> None:
        """The election's verdict (only :mod:`ferry.host.cluster.election` calls this)."""
        self._leader = leading

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.store.endpoints

    async def refresh_meta(self) -> ClusterMeta:
        entry = await self.store.get(self.keys.meta)
        if entry is not None:
            self._meta = ClusterMeta.from_json(entry.value)
        return self._meta

    async def nodes(self) -> list[NodeView]:
        """Every member with its state, read from the store now."""
        entries = await self.store.range(self.keys.prefix)
        meta = next((e for e in entries if e.key == self.keys.meta), None)
        if meta is not None:
            self._meta = ClusterMeta.from_json(meta.value)
        return node_views(entries, self.keys)

    async def record_event(
        self, kind: str, *, vm: str | None = None, node: str | None = None, reason: str = ""
    ) -> None:
        """Append one event (``events/<revision-padded>``, ordered by the store's revision).

        The key is one past the revision read; if another writer took it, read
        again. A key number is never above the revision its put lands at, so
        keys sort in the order events were written.
        """
        record = EventRecord(at=self.clock(), kind=str(kind), node=node, vm=vm, reason=reason)
        await append_event(self.store, self.keys, record)
        self.log.info("event %s node=%s vm=%s: %s", kind, node, vm, reason)

    async def events(self) -> list[EventRecord]:
        return [EventRecord.from_json(e.value) for e in await self.store.range(self.keys.events)]

    async def prune_events(self, keep: int = EVENTS_KEPT) -> int:
        """Delete all but the newest ``keep`` events (the leader does it now and then)."""
        entries = await self.store.range(self.keys.events)
        old = entries[: max(0, len(entries) - keep)]
        for start in range(0, len(old), 100):  # etcd takes up to 128 ops per transaction
            await self.store.txn([], [Delete(e.key) for e in old[start : start + 100]])
        return len(old)

    # -- this node's records ----------------------------------------------------------

    async def put_alive(self) -> None:
        """``alive/<node>`` with this node's lease (and what it has free)."""
        record = AliveRecord(self.node, self.memory_free(), self.clock())
        await self.store.put(self.keys.alive(self.node), record.to_json(), lease=self.lease)

    async def put_member(self, member: MemberRecord) -> None:
        self.member = member
        await self.store.put(self.keys.member(self.node), member.to_json())

    async def regrant(self) -> int:
        """A new lease after the old one was lost; ``alive/<node>`` goes up again with it.

        The fenced mark (if the fencing module wrote one) stays: a node that
        killed its QEMUs says so until it reconnects or is resumed.
        """
        old = self.lease
        self.lease = await self.store.grant(self.timings.ttl_s)
        self._leader = False
        await self.put_alive()
        self.log.warning("lease %x was lost; new lease %x", old, self.lease)
        for listener in list(self.lease_listeners):
            listener(self.lease)
        await self.record_event(EventKind.LEASE_REGRANTED, node=self.node,
                                reason=f"lease {old:x} expired or was revoked")  # fmt: skip
        return self.lease

    async def on_lease_lost(self) -> None:
        """What the lease keeper calls when etcd says the lease is gone."""
        await self.regrant()


Listener = Callable[["Membership | None"], Awaitable[None]]


@dataclass
class ClusterContext:
    """The agent's one holder of its membership; ``membership`` is None outside a cluster.

    Joins and leaves happen while the agent runs, so services keep this holder,
    not a membership; listeners hear of each change (a new membership, or None
    after a leave) and may start or stop their own work.
    """

    membership: Membership | None = None
    listeners: list[Listener] = field(default_factory=list)

    def listen(self, listener: Listener) -> None:
        self.listeners.append(listener)

    async def change(self, membership: Membership | None) -> None:
        self.membership = membership
        for listener in list(self.listeners):
            try:
                await listener(membership)
            except asyncio.CancelledError:
                raise
            except Exception:  # one listener's failure must not stop the others
                log.exception("a cluster listener failed on a membership change")
