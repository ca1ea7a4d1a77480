"""Joining, leaving and reconnecting this host to a cluster: the agent's one ClusterService.

A host is in at most one cluster. ``create`` writes the cluster's ``meta``
(only if absent) and joins; ``join`` grants this node a lease, puts its
``members/`` and ``alive/`` records (the latter with the lease) and clears a
``fenced/`` mark, then writes ``<data_dir>/cluster.json``
(:mod:`ferry.host.cluster.persisted`); on agent start :meth:`start`
reconnects with that file, keeping the lease if etcd still has it (so a
restarted agent is not taken for a dead node), retrying in the background
while etcd does not answer. ``leave`` is refused while the node owns VMs or
is the last node; otherwise it removes the node's records, revokes its lease
and removes the file. Every refusal is one line and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.nodes import AliveRecord, MemberRecord, node_views, owner_of
from ferry.core.cluster.records import ClusterMeta, EventKind, VolumeRecord
from ferry.core.cluster.store import ClusterStore, Compare, Delete, Put
from ferry.core.cluster.timing import ClusterTimings
from ferry.core.spec import check_name
from ferry.core.tasks import cancel_and_wait
from ferry.errors import (
    ConflictError,
    FerryError,
    InvalidInputError,
    LeaseLostError,
    NotFoundError,
    StoreUnavailableError,
    VersionError,
)
from ferry.host.cluster import persisted
from ferry.host.cluster.membership import ClusterContext, Membership
from ferry.host.cluster.node_loop import LeaderWork, NodeLoops
from ferry.host.cluster.persisted import ClusterFile

log = logging.getLogger(__name__)

# (endpoints, client TLS dir or None) -> a store; the agent passes
# ferry.adapters.etcd.open_store, unit tests a MemoryStore factory.
StoreFactory = Callable[[Sequence[str], Path | None], ClusterStore]
# How long the background reconnect waits between attempts.
RECONNECT_RETRY_S = 2.0


@dataclass(frozen=True)
class NodeIdentity:
    """What this host says of itself in ``members/<node>``."""

    name: str
    url: str
    version: str
    functional_level: int
    data_dir: Path
    tls_dir: Path


def check_endpoints(etcd: Sequence[str]) -> tuple[str, ...]:
    urls = tuple(u.strip().rstrip("/") for u in etcd if u.strip())
    if not urls:
        raise InvalidInputError("give at least one etcd URL (--etcd https://HOST:PORT)")
    for url in urls:
        scheme, sep, rest = url.partition("://")
        if scheme not in ("http", "https") or not sep or not rest:
            raise InvalidInputError(f"etcd URL {url!r} must look like https://HOST:PORT")
    return urls


class ClusterService:
    """This host's membership: create, join, leave, reconnect; see the module docstring."""

    def __init__(
        self,
        me: NodeIdentity,
        *,
        timings: ClusterTimings,
        open_store: StoreFactory,
        context: ClusterContext | None = None,
        memory_free: Callable[[], int] = lambda: 0,
        leader_work: Callable[[Membership], LeaderWork] | None = None,
        lease_keeper: Callable[[Membership], Coroutine[Any, Any, None]] | None = None,
        clock: Callable[[], float] = time.time,
        autostart: bool = True,
    ) -> None:
        self.me = me
        self.autostart = autostart  # False: tests drive NodeLoops.lead_once themselves
        self.timings = timings
        self.open_store = open_store
        self.context = context or ClusterContext()
        self.memory_free = memory_free
        self.leader_work = leader_work
        self.lease_keeper = lease_keeper
        self.clock = clock
        self.loops: NodeLoops | None = None
        self._file: ClusterFile | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def membership(self) -> Membership | None:
        return self.context.membership

    # -- agent life cycle -------------------------------------------------------------

    async def start(self) -> None:
        """Reconnect with ``cluster.json`` if there is one; retry in the background."""
        self._file = persisted.load(self.me.data_dir)
        if self._file is None:
            return
        try:
            await self._connect(self._file)
        except StoreUnavailableError as exc:
            log.warning("cluster %s: cannot reconnect now (%s); retrying every %gs",
                        self._file.name, exc, RECONNECT_RETRY_S)  # fmt: skip
            self._reconnect = asyncio.create_task(self._retry(self._file), name="cluster-reconnect")
        except FerryError as exc:  # the agent serves anyway; GET /v1/cluster says not connected
            log.error("cluster %s: cannot reconnect: %s", self._file.name, exc)

    async def _retry(self, file: ClusterFile) -> None:
        while self.membership is None:
            await asyncio.sleep(RECONNECT_RETRY_S)
            try:
                async with self._lock:
                    if self.membership is None and self._file == file:
                        await self._connect(file)
            except StoreUnavailableError:
                continue
            except FerryError as exc:
                log.error("cluster %s: cannot reconnect: %s", file.name, exc)
                return

    async def shutdown(self) -> None:
        """Stop the node's tasks; the lease is kept (a restart reconnects with it)."""
        if self._reconnect is not None:
            await cancel_and_wait(self._reconnect)
        m = self.membership
        if self.loops is not None:
            await self.loops.stop()
            self.loops = None
        if m is not None:
            await m.store.close()

    # -- what the API reads -----------------------------------------------------------

    def info(self) -> dict[str, Any] | None:
        """``GET /v1/cluster``: this host's cluster, or None."""
        if self._file is None:
            return None
        m = self.membership
        return {"name": self._file.name, "node": self.me.name, "etcd": list(self._file.etcd),
                "etcd_tls": self._file.etcd_tls, "connected": m is not None,
                "leader": m.is_leader() if m is not None else False}  # fmt: skip

    def member_of(self, cluster: str) -> Membership:
        """This host's membership of ``cluster``; NotFoundError naming what it is in."""
        m = self.membership
        if m is not None and m.cluster == cluster:
            return m
        if self._file is not None and self._file.name == cluster:
            raise StoreUnavailableError(f"host {self.me.name} is a node of cluster {cluster} "
                                        f"but cannot reach its etcd at "
                                        f"{', '.join(self._file.etcd)} yet")  # fmt: skip
        where = f"it is in cluster {self._file.name}" if self._file else "it is in no cluster"
        raise NotFoundError(f"host {self.me.name} is not a node of cluster {cluster!r} ({where})")

    async def show(self, cluster: str) -> dict[str, Any]:
        """``cluster show``: the cluster, its leader, level, nodes and volumes."""
        m = self.member_of(cluster)
        entries = await m.store.range(m.keys.prefix)
        by_key = {e.key: e for e in entries}
        meta = by_key.get(m.keys.meta)
        level = ClusterMeta.from_json(meta.value).functional_level if meta else None
        leader = by_key.get(m.keys.leader)
        volumes = [VolumeRecord.from_json(e.value) for e in entries
                   if e.key.startswith(m.keys.volumes)]  # fmt: skip
        return {"name": cluster, "etcd": list(m.endpoints),
                "leader": leader.value.decode() if leader else None,
                "functional_level": level,
                "nodes": [view.as_dict() for view in node_views(entries, m.keys)],
                "volumes": [{"name": v.name, "path": v.path} for v in volumes]}  # fmt: skip

    async def events(self, cluster: str) -> list[dict[str, Any]]:
        """``cluster events``: oldest first."""
        return [event.as_dict() for event in await self.member_of(cluster).events()]

    # -- create, join, leave ----------------------------------------------------------

    def _tls_for(self, etcd: Sequence[str], etcd_tls: str | None) -> Path | None:
        if etcd_tls:
            return Path(etcd_tls)
        return self.me.tls_dir if any(u.startswith("https://") for u in etcd) else None

    def _refuse_if_member(self, name: str) -> None:
        if self._file is None:
            return
        if self._file.name == name:
            raise ConflictError(f"host {self.me.name} is already a node of cluster {name}")
        raise ConflictError(f"host {self.me.name} is already a node of cluster "
                            f"{self._file.name}; a host is in one cluster at a time (leave "
                            f"it first: ferry cluster leave {self._file.name} --host "
                            f"{self.me.name})")  # fmt: skip

    async def _open(self, name: str, etcd: Sequence[str], etcd_tls: str | None
                    ) -> tuple[ClusterStore, tuple[str, ...]]:  # fmt: skip
        check_name(name, what="cluster name")
        urls = check_endpoints(etcd)
        self._refuse_if_member(name)
        return self.open_store(urls, self._tls_for(urls, etcd_tls)), urls

    async def create(self, name: str, etcd: Sequence[str], etcd_tls: str | None) -> dict[str, Any]:
        async with self._lock:
            store, urls = await self._open(name, etcd, etcd_tls)
            try:
                keys = ClusterKeys(name)
                meta = ClusterMeta(name, self.clock(), self.me.functional_level)
                made = await store.txn(
                    [Compare.absent(keys.meta)], [Put(keys.meta, meta.to_json())]
                )
                if not made.succeeded:
                    raise ConflictError(f"cluster {name} already exists in etcd at "
                                        f"{', '.join(urls)}; join it: ferry cluster join {name} "
                                        f"--host {self.me.name}")  # fmt: skip
                try:
                    m = await self._join(store, name, urls, etcd_tls, meta, created=True)
                except BaseException:
                    await store.delete(keys.prefix, prefix=True)  # all of it is ours
                    raise
            except BaseException:
                await store.close()
                raise
        return self._joined_view(m)

    async def join(self, name: str, etcd: Sequence[str], etcd_tls: str | None) -> dict[str, Any]:
        async with self._lock:
            store, urls = await self._open(name, etcd, etcd_tls)
            try:
                entry = await store.get(ClusterKeys(name).meta)
                if entry is None:
                    raise NotFoundError(f"no cluster named {name!r} in etcd at {', '.join(urls)}")
                m = await self._join(
                    store, name, urls, etcd_tls, ClusterMeta.from_json(entry.value)
                )
            except BaseException:
                await store.close()
                raise
        return self._joined_view(m)

    def _joined_view(self, m: Membership) -> dict[str, Any]:
        return {"name": m.cluster, "node": m.node, "etcd": list(m.endpoints),
                "lease": m.lease, "functional_level": m.functional_level}  # fmt: skip

    def _member_record(self, joined: float) -> MemberRecord:
        me = self.me
        return MemberRecord(name=me.name, url=me.url, version=me.version,
                            functional_level=me.functional_level, joined=joined)  # fmt: skip

    async def _join(self, store: ClusterStore, name: str, urls: tuple[str, ...],
                    etcd_tls: str | None, meta: ClusterMeta, *, created: bool = False
                    ) -> Membership:  # fmt: skip
        keys = ClusterKeys(name)
        if self.me.functional_level < meta.functional_level:
            raise VersionError(f"host {self.me.name} runs functional level "
                               f"{self.me.functional_level}, below cluster {name}'s level "
                               f"{meta.functional_level}; a node must run at least the "
                               "cluster's level")  # fmt: skip
        if await store.get(keys.alive(self.me.name)) is not None:
            raise ConflictError(f"a live node named {self.me.name} is already in cluster {name}")
        lease = await store.grant(self.timings.ttl_s)
        try:
            m = self._membership(store, name, lease, meta, self._member_record(self.clock()))
            done = await store.txn(
                [Compare.absent(keys.alive(self.me.name))],
                [Put(keys.member(self.me.name), m.member.to_json()),
                 Put(keys.alive(self.me.name), self._alive(m), lease=lease),
                 Delete(keys.fenced(self.me.name))],
            )  # fmt: skip
            if not done.succeeded:
                raise ConflictError(f"a live node named {self.me.name} is already in cluster "
                                    f"{name}")  # fmt: skip
            if created:
                await m.record_event(EventKind.CREATED, node=self.me.name,
                                     reason=f"etcd at {', '.join(urls)}")  # fmt: skip
            await m.record_event(EventKind.JOINED, node=self.me.name,
                                 reason=f"functional level {self.me.functional_level}, "
                                        f"ferry {self.me.version}")  # fmt: skip
            self._save(ClusterFile(name, urls, etcd_tls, lease))
        except BaseException:
            await store.revoke(lease)
            await store.delete(keys.member(self.me.name))
            raise
        await self._activate(m)
        return m

    def _alive(self, m: Membership) -> bytes:
        return AliveRecord(m.node, self.memory_free(), self.clock()).to_json()

    def _membership(self, store: ClusterStore, name: str, lease: int, meta: ClusterMeta,
                    member: MemberRecord) -> Membership:  # fmt: skip
        m = Membership(store, cluster=name, node=self.me.name, lease=lease,
                       timings=self.timings, member=member, meta=meta,
                       memory_free=self.memory_free, clock=self.clock)  # fmt: skip
        m.lease_listeners.append(self._lease_changed)
        return m

    def _lease_changed(self, lease: int) -> None:
        if self._file is not None:
            f = self._file
            self._save(ClusterFile(f.name, f.etcd, f.etcd_tls, lease))

    def _save(self, file: ClusterFile) -> None:
        persisted.save(self.me.data_dir, file)
        self._file = file

    async def _activate(self, m: Membership) -> None:
        work = self.leader_work(m) if self.leader_work is not None else None
        self.loops = NodeLoops(m, leader_work=work, lease_keeper=self.lease_keeper)
        if self.autostart:
            self.loops.start()
        await self.context.change(m)

    async def _connect(self, file: ClusterFile) -> None:
        """Reconnect at start: keep the lease if it lives, put this node's records again."""
        store = self.open_store(file.etcd, self._tls_for(file.etcd, file.etcd_tls))
        try:
            keys = ClusterKeys(file.name)
            entry = await store.get(keys.meta)
            if entry is None:
                raise NotFoundError(f"cluster {file.name} is gone from etcd at "
                                    f"{', '.join(file.etcd)}; remove "
                                    f"{self.me.data_dir / persisted.FILE}")  # fmt: skip
            meta = ClusterMeta.from_json(entry.value)
            old = await store.get(keys.member(self.me.name))
            joined = MemberRecord.from_json(old.value).joined if old else self.clock()
            draining = MemberRecord.from_json(old.value).draining if old else False
            kept = file.lease != 0 and await self._renewed(store, file.lease, self.timings.ttl_s)
            lease = file.lease if kept else await store.grant(self.timings.ttl_s)
            member = self._member_record(joined)
            member = MemberRecord(**{**member.__dict__, "draining": draining})
            m = self._membership(store, file.name, lease, meta, member)
            await store.txn([], [Put(keys.member(self.me.name), member.to_json()),
                                 Put(keys.alive(self.me.name), self._alive(m), lease=lease),
                                 Delete(keys.fenced(self.me.name))])  # fmt: skip
            self._save(ClusterFile(file.name, file.etcd, file.etcd_tls, lease))
            how = f"lease {lease:x} kept" if kept else f"new lease {lease:x}"
            await m.record_event(EventKind.RECONNECTED, node=self.me.name,
                                 reason=f"agent started; {how}")  # fmt: skip
        except BaseException:
            await store.close()
            raise
        await self._activate(m)

    @staticmethod
    async def _renewed(store: ClusterStore, lease: int, ttl_s: int) -> bool:
        """Renew a kept lease at once: its TTL may be nearly spent after the restart, and
        the lease keeper would take an expiry during start-up for a lost lease (and fence).

        A lease granted with another TTL than ``cluster_lease_ttl`` now says is not
        kept: the fencing deadlines are derived from the configured TTL, and are
        safe only if etcd expires the lease no sooner than that. (It is not
        revoked either: the alive record moves to the new lease in one put, while
        a revoke would show this node lost, its QEMUs still running.)
        """
        try:
            granted = await store.keepalive(lease)
        except LeaseLostError:
            return False
        return granted == ttl_s

    async def leave(self, name: str) -> dict[str, Any]:
        async with self._lock:
            m = self.member_of(name)
            node = m.node
            entries = await m.store.range(m.keys.prefix)
            names = {e.value.decode(): ClusterKeys.last_part(e.key)
                     for e in entries if e.key.startswith(m.keys.names)}  # fmt: skip
            owned = sorted(names.get(ClusterKeys.vm_uuid_of(e.key), ClusterKeys.vm_uuid_of(e.key))
                           for e in entries
                           if e.key.startswith(m.keys.vms) and e.key.endswith("/owner")
                           and owner_of(e.value) == node)  # fmt: skip
            if owned:
                raise ConflictError(
                    f"node {node} still owns {len(owned)} VM(s) of cluster {name} "
                    f"({', '.join(owned)}); drain it first (ferry cluster drain {node} "
                    f"--cluster {name}) or remove them from the cluster")  # fmt: skip
            members = [e for e in entries if e.key.startswith(m.keys.members)]
            if len(members) <= 1:
                raise ConflictError(f"node {node} is the last node of cluster {name}; a "
                                    "cluster keeps at least one node")  # fmt: skip
            if self.loops is not None:
                await self.loops.stop()
                self.loops = None
            await m.record_event(EventKind.LEFT, node=node, reason="asked by an admin")
            await m.store.txn([], [Delete(m.keys.member(node)), Delete(m.keys.alive(node)),
                                   Delete(m.keys.fenced(node))])  # fmt: skip
            await m.store.txn([Compare.holds(m.keys.leader, node.encode())],
                              [Delete(m.keys.leader)])  # fmt: skip
            await m.store.revoke(m.lease)
            await m.store.close()
            persisted.remove(self.me.data_dir)
            self._file = None
            await self.context.change(None)
        return {"name": name, "node": node, "left": True}
