"""The replica broker, a node's side: a cluster as a replica target (``--replica cluster:C``).

Theory of operation. The rules are :mod:`ferry.core.replication.broker`;
this keeps them in the cluster's store:

* **Settings, once for the cluster.** ``replica-server enable --cluster C
  --volume V --allow ...`` puts :class:`ReplicaServerSettings` into
  ``replica-server`` of C's store, the storage being ``<V>/replicas`` on C's
  volume V, which every node sees at one path (:meth:`ReplicaBroker.configure`).
* **Accepting.** An offer that names the cluster is admitted by those settings
  and the level rule (:meth:`admit`) on whichever node answered; that node
  writes the replica VM into its catalog as a replica host does, then claims
  ``replicas/<uuid>/owner`` (absent before) and puts ``replicas/<uuid>/record``
  (:class:`ReplicaRecord`: spec, relationship, chain).
* **Every change is published.** After a point, a file or new terms the owner
  puts the record again, compare-and-swap on its owner entry; a node that is
  no longer the owner fails the call, and the primary's next cycle asks again.
* **Locating.** Before its first call about a replica VM, the primary asks
  any node of C which node holds it (``LOCATE``, :meth:`locate`). The owner,
  asked, first makes its catalog equal to the record (a node that just became
  the owner imports it; the chain's files are already on the volume); any
  other node names the owner and drops a stale copy of its own. The primary
  then talks to the owner (``ferry.peer.broker``, the redirect), whatever
  node that is now.
* **Losing a node.** The HA leader gives the replica VMs of a lost node to an
  up node (``ferry.core.replication.broker.reowns``, applied by
  :mod:`ferry.host.cluster.ha`); the primary is told nothing, its next cycle
  locates the new owner.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ferry.adapters.catalog import Catalog
from ferry.adapters.pki import CLIENT_CERT, CertInfo, Role, thumbprint
from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.nodes import MemberRecord
from ferry.core.cluster.records import VolumeRecord
from ferry.core.cluster.roles import Owner
from ferry.core.cluster.store import Compare, Delete, Entry, Put
from ferry.core.relationship import Extension, Relationship
from ferry.core.relationship import Role as RelRole
from ferry.core.replica_server import Admission, AllowEntry, ReplicaServerSettings, check_settings
from ferry.core.replication import ClusterHost, check_partner
from ferry.core.replication.broker import ReplicaRecord, admit_primary, route
from ferry.core.vmstate import VmState
from ferry.errors import (
    AuthError,
    ConflictError,
    FerryError,
    InvalidInputError,
    NotFoundError,
    StateError,
)
from ferry.host.cluster.membership import ClusterContext, Membership
from ferry.host.replication.receiver import caller_of
from ferry.peer.client import Connector, Timeout
from ferry.peer.replication import UPDATE, BrokerOwner, Offer, ReplicaChanges

log = logging.getLogger(__name__)

REPLICAS_DIR = "replicas"  # on the cluster volume: <volume>/replicas/<uuid>/


class ReplicaBroker:
    """This node's part in its cluster being a replica target; see the module docstring."""

    def __init__(self, context: ClusterContext, catalog: Catalog, *, node: str,
                 url: str) -> None:  # fmt: skip
        self.context = context
        self.catalog = catalog
        self.node = node
        self.url = url
        # Makes a VM of this node one of its cluster (ClusterVms.add; set by the agent).
        self.make_clustered: Callable[[str, str], Awaitable[object]] | None = None
        # Takes a VM out of a cluster if it is in it (failover cancel after it joined).
        self.make_plain: Callable[[str, str], Awaitable[object]] | None = None
        # Extended replication from a replica VM taken over here (set by the agent):
        # reaching the extended host, and starting the extension's schedule.
        self.peers: Connector | None = None
        self.tls_dir = Path()
        self.resume: Callable[[str], None] | None = None

    # -- extended replication onward ----------------------------------------------------

    async def _hosts(self, m: Membership) -> list[ClusterHost]:
        """C's nodes with the certificate each publishes (``identities/<node>``)."""
        members = {MemberRecord.from_json(e.value).name
                   for e in await m.store.range(m.keys.members)}  # fmt: skip
        found = []
        for entry in await m.store.range(m.keys.identities):
            data = json.loads(entry.value)
            if data.get("name") in members and data.get("thumbprint"):
                found.append(ClusterHost(str(data["name"]), str(data["thumbprint"])))
        return sorted(found, key=lambda h: h.name)

    async def _tell_extended(self, m: Membership, ext: Extension, *,
                             claim: bool) -> None:  # fmt: skip
        """The extended host accepts any node of C as its primary (``claim``: this one is)."""
        if self.peers is None:
            return
        hosts = await self._hosts(m)
        change = ReplicaChanges(cluster=m.cluster, cluster_hosts=hosts)
        if claim:
            change = change.model_copy(update={
                "primary": self.node, "thumbprint": thumbprint(self.tls_dir / CLIENT_CERT),
                "primary_url": self.url})  # fmt: skip
        async with self.peers.connect(ext.host, ext.url, timeout=Timeout.CONTROL,
                                      pin=ext.thumbprint) as peer:  # fmt: skip
            await peer.call(UPDATE, change, uuid=ext.vm_uuid)

    async def extension_changed(self, uuid: str, *, created: bool = False) -> None:
        """After ``replication extend`` (the extended host learns C's nodes) and after
        each of its cycles: the cluster's record follows."""
        rel = self.catalog.relationship(uuid)
        ext = self.catalog.extension(uuid)
        if rel is None or not rel.broker or ext is None:
            return
        m = self.membership(rel.broker)
        if created:
            await self._tell_extended(m, ext, claim=False)
        await self.publish(uuid)

    async def resume_extension(self, m: Membership, record: ReplicaRecord) -> None:
        """This node just took the replica VM over: it takes the extended host's primary's
        place and runs the extension's schedule. A failure is logged; the extension's next
        cycle, refused there, claims again (:meth:`reclaim_extension`)."""
        assert record.extension is not None
        try:
            await self._tell_extended(m, record.extension, claim=True)
        except FerryError as exc:  # its schedule runs all the same: a cycle claims again
            log.warning("VM %s: extended host %s did not take %s as its primary yet: %s",
                        record.spec.name, record.extension.host, self.node, exc)  # fmt: skip
        if self.resume is not None:
            self.resume(record.spec.uuid)
        log.info("VM %s: extended replication to %s runs from %s now", record.spec.name,
                 record.extension.host, self.node)  # fmt: skip

    async def reclaim_extension(self, uuid: str) -> bool:
        """The extended host refused this node as its primary: if this node holds the
        brokered replica, claim the primary's place there again (True if it did)."""
        rel = self.catalog.relationship(uuid)
        ext = self.catalog.extension(uuid)
        if rel is None or not rel.broker or ext is None:
            return False
        m = self.membership(rel.broker)
        entry = await m.store.get(m.keys.replica_owner(uuid))
        if entry is None or Owner.decode(entry.value).node != self.node:
            return False  # not the holder: the refusal stands
        await self._tell_extended(m, ext, claim=True)
        return True

    # -- failover ----------------------------------------------------------------------

    async def check_held(self, rel: Relationship) -> None:
        """A failover of a brokered replica runs only on the node that holds it now."""
        if rel.role is not RelRole.REPLICA or not rel.broker:
            return
        m = self.membership(rel.broker)
        entry = await m.store.get(m.keys.replica_owner(rel.vm_uuid))
        holder = Owner.decode(entry.value).node if entry is not None else None
        if holder != self.node:
            self.drop_stale(rel.vm_uuid)
            where = f"node {holder!r} holds it now: fail over there (--host {holder})" \
                if holder else "no node of the cluster holds it"  # fmt: skip
            raise StateError(f"this copy of the replica of VM {rel.vm_name!r} on {self.node!r} "
                             f"is stale; {where}")  # fmt: skip

    async def on_membership(self, membership: Membership | None) -> None:
        """A node back in its cluster drops its copies of replica VMs another node holds
        now (it lost them while down), so only the holder shows and fails them over."""
        if membership is None:
            return
        for rel in self.catalog.relationships():
            if rel.role is not RelRole.REPLICA or rel.broker != membership.cluster:
                continue
            entry = await membership.store.get(membership.keys.replica_owner(rel.vm_uuid))
            if entry is not None and Owner.decode(entry.value).node != self.node:
                self.drop_stale(rel.vm_uuid)

    async def failed_over(self, rel: Relationship) -> dict[str, Any]:
        """A failover started a brokered replica VM here: it becomes a VM of the cluster
        (role, owner this node, want running: the cluster's HA restarts it from now on),
        and the replica's records leave the store."""
        if rel.role is not RelRole.REPLICA or not rel.broker or self.make_clustered is None:
            return {}
        m = self.membership(rel.broker)
        await self.make_clustered(rel.broker, rel.vm_name)
        owner_key = m.keys.replica_owner(rel.vm_uuid)
        await m.store.txn([], [Delete(owner_key), Delete(m.keys.replica_record(rel.vm_uuid))])
        log.info("VM %s: failed over into cluster %s, highly available there", rel.vm_name,
                 rel.broker)  # fmt: skip
        return {"cluster": rel.broker}

    async def leave_cluster(self, rel: Relationship) -> None:
        """A failover into the cluster is cancelled: the VM leaves it before it stops
        (a clustered VM that stops wanting to run is restarted by the cluster's HA)."""
        if rel.role is not RelRole.REPLICA or not rel.broker or self.make_plain is None:
            return
        self.membership(rel.broker)  # one line if this node left the cluster meanwhile
        await self.make_plain(rel.broker, rel.vm_name)

    async def replica_again(self, rel: Relationship) -> None:
        """After the cancel: this node holds the replica in the store again, with its
        record, so cycles and a later failover find it here."""
        if rel.role is RelRole.REPLICA and rel.broker:
            await self.claim(rel.broker, rel.vm_uuid)
            log.info("VM %s: failover into cluster %s cancelled; its replica again on %s",
                     rel.vm_name, rel.broker, self.node)  # fmt: skip

    def membership(self, cluster: str) -> Membership:
        m = self.context.membership
        if m is None or m.cluster != cluster:
            where = f"cluster {m.cluster!r}" if m is not None else "no cluster"
            raise NotFoundError(f"host {self.node!r} is not a node of cluster {cluster!r} "
                                f"(it is in {where})")  # fmt: skip
        return m

    # -- settings ----------------------------------------------------------------------

    async def settings(self, m: Membership) -> ReplicaServerSettings:
        entry = await m.store.get(m.keys.replica_server)
        if entry is None:
            return ReplicaServerSettings()
        return ReplicaServerSettings.model_validate_json(entry.value)

    async def show(self, cluster: str) -> dict[str, Any]:
        m = self.membership(cluster)
        return {"cluster": cluster, **(await self.settings(m)).model_dump(mode="json")}

    async def configure(self, cluster: str, *, volume: str, allow: list[dict[str, Any]],
                        allow_any: bool) -> dict[str, Any]:  # fmt: skip
        """``replica-server enable --cluster C --volume V``: one record in C's store."""
        m = self.membership(cluster)
        volumes = {VolumeRecord.from_json(e.value).name: VolumeRecord.from_json(e.value).path
                   for e in await m.store.range(m.keys.volumes)}  # fmt: skip
        if volume not in volumes:
            known = ", ".join(sorted(volumes)) or "none"
            raise NotFoundError(f"cluster {cluster!r} has no volume {volume!r} (volumes: "
                                f"{known})")  # fmt: skip
        storage = str(Path(volumes[volume]) / REPLICAS_DIR)
        try:
            entries = tuple(
                AllowEntry(pattern=str(e["pattern"]), trust_group=e.get("trust_group"))
                for e in allow
            )
        except ValueError as exc:
            raise InvalidInputError(f"--allow: {exc}") from exc
        settings = check_settings(ReplicaServerSettings(
            enabled=True, storage=storage, allow=entries, allow_any=allow_any))  # fmt: skip
        Path(storage).mkdir(exist_ok=True)
        await m.store.put(m.keys.replica_server, settings.model_dump_json().encode())
        await m.record_event("replica-server-enabled", node=self.node,
                             reason=f"replica VMs on volume {volume} ({storage})")  # fmt: skip
        return {"cluster": cluster, "volume": volume, **settings.model_dump(mode="json")}

    async def disable(self, cluster: str) -> dict[str, Any]:
        m = self.membership(cluster)
        settings = (await self.settings(m)).model_copy(update={"enabled": False})
        await m.store.put(m.keys.replica_server, settings.model_dump_json().encode())
        return {"cluster": cluster, **settings.model_dump(mode="json")}

    # -- accepting ---------------------------------------------------------------------

    async def admit(self, caller: CertInfo, offer: Offer) -> Admission:
        """The cluster's answer to an offer naming it; nothing is written."""
        if caller.role is not Role.HOST:
            raise AuthError("only a ferry host can be a primary")
        m = self.membership(offer.cluster)
        admission = admit_primary(await self.settings(m), caller.common_name,
                                  cluster=m.cluster, primary_level=offer.functional_level,
                                  cluster_level=m.functional_level, vm=offer.spec.name)  # fmt: skip
        owner = await m.store.get(m.keys.replica_owner(offer.spec.uuid))
        if owner is not None and Owner.decode(owner.value).node != self.node:
            raise ConflictError(f"cluster {m.cluster!r} already holds a replica of VM "
                                f"{offer.spec.name!r} (on node "
                                f"{Owner.decode(owner.value).node!r})")  # fmt: skip
        return admission

    async def claim(self, cluster: str, uuid: str) -> None:
        """The offer was written into this node's catalog: own it in the store, with its
        record, in one transaction (a resent offer finds it owned here already)."""
        m = self.membership(cluster)
        record = self._record(uuid)
        owner_key = m.keys.replica_owner(uuid)
        done = await m.store.txn(
            [Compare.absent(owner_key)],
            [Put(owner_key, Owner.settled(self.node).encode()),
             Put(m.keys.replica_record(uuid), record.model_dump_json().encode())],
        )  # fmt: skip
        if not done.succeeded:
            await self.publish(uuid)

    # -- publishing --------------------------------------------------------------------

    def _record(self, uuid: str) -> ReplicaRecord:
        rel = self.catalog.relationship(uuid)
        vm = self.catalog.find(uuid)
        if rel is None or vm is None:
            raise NotFoundError(f"host {self.node!r} holds no replica of VM {uuid}")
        return ReplicaRecord(spec=vm.spec, relationship=rel,
                             points=ReplicaRecord.points_of(self.catalog.points(uuid)),
                             extension=self.catalog.extension(uuid))  # fmt: skip

    def is_brokered(self, uuid: str) -> bool:
        rel = self.catalog.relationship(uuid)
        return rel is not None and rel.role is RelRole.REPLICA and bool(rel.broker)

    async def publish(self, uuid: str, *, cluster: str | None = None) -> None:
        """Put this node's copy into the store (it must still own it); a removed
        relationship takes the store's records with it."""
        rel = self.catalog.relationship(uuid)
        cluster = cluster or (rel.broker if rel is not None else "")
        if not cluster:
            return
        m = self.membership(cluster)
        owner_key = m.keys.replica_owner(uuid)
        entry = await m.store.get(owner_key)
        if entry is None or Owner.decode(entry.value).node != self.node:
            holder = Owner.decode(entry.value).node if entry is not None else "nobody"
            raise StateError(
                f"the replica of VM {uuid} in cluster {cluster!r} is held by "
                f"{holder!r} now, not {self.node!r}; the next cycle lands there"
            )
        if rel is None or rel.role is not RelRole.REPLICA:
            ops: list[Put | Delete] = [Delete(owner_key), Delete(m.keys.replica_record(uuid))]
        else:
            ops = [Put(m.keys.replica_record(uuid), self._record(uuid).model_dump_json().encode())]
        done = await m.store.txn([Compare.unchanged(owner_key, entry.mod_revision)], ops)
        if not done.succeeded:
            raise StateError(
                f"the replica of VM {uuid} in cluster {cluster!r} changed node "
                "while this one wrote it; the next cycle lands on its new node"
            )

    # -- locating ----------------------------------------------------------------------

    async def locate(self, caller: CertInfo, cluster: str, uuid: str) -> BrokerOwner:
        """Which node of the cluster holds the replica VM; the owner imports it first.

        Only the replica's pinned primary is told (an admin is told it is not there)."""
        try:
            m = self.membership(cluster)
            owner_entry = await m.store.get(m.keys.replica_owner(uuid))
            record_entry = await m.store.get(m.keys.replica_record(uuid))
            if owner_entry is None or record_entry is None:
                raise NotFoundError(f"cluster {cluster!r} holds no replica of VM {uuid}")
        except NotFoundError:
            if caller.role is Role.ADMIN:
                raise
            raise AuthError(f"host {caller.common_name!r} is not the primary of a replica VM "
                            f"{uuid} in cluster {cluster!r}; refused") from None  # fmt: skip
        record = ReplicaRecord.model_validate_json(record_entry.value)
        rel = record.relationship
        check_partner(caller_of(caller), vm=rel.vm_name, partner=rel.primary,
                      thumbprint=rel.thumbprint)  # fmt: skip
        owner = Owner.decode(owner_entry.value)
        alive = {ClusterKeys.last_part(e.key) for e in await m.store.range(m.keys.alive_prefix)}
        where = route(self.node, owner=owner.node, pending=owner.pending, alive=alive,
                      cluster=cluster, vm=rel.vm_name)  # fmt: skip
        if where.local:
            if self.import_record(record) and record.extension is not None:
                await self.resume_extension(m, record)
            return BrokerOwner(node=self.node, url=self.url)
        self.drop_stale(uuid)
        member = await m.store.get(m.keys.member(where.node))
        url = _member_url(member)
        if not url:
            raise StateError(f"node {where.node!r} of cluster {cluster!r} has no address in "
                             "the store")  # fmt: skip
        return BrokerOwner(node=where.node, url=url)

    def import_record(self, record: ReplicaRecord) -> bool:
        """Make this node's catalog hold the record's replica VM, relationship and chain
        (the store wins); True if anything was written."""
        uuid = record.spec.uuid
        if self.catalog.relationship(uuid) == record.relationship and \
                self.catalog.points(uuid) == record.chain() and \
                self.catalog.extension(uuid) == record.extension:  # fmt: skip
            vm = self.catalog.find(uuid)
            if vm is not None and vm.spec == record.spec:
                return False
        vm = self.catalog.find(uuid)
        if vm is None:
            self.catalog.add_vm(record.spec, VmState.REPLICA)
        else:
            self.catalog.update_spec(record.spec)
        self.catalog.put_relationship(record.relationship)
        for point in self.catalog.points(uuid):
            self.catalog.delete_point(uuid, point.id)
        for point in record.chain():
            self.catalog.add_point(uuid, point)
        if record.extension is not None:
            self.catalog.put_extension(record.extension)
        elif self.catalog.extension(uuid) is not None:
            self.catalog.delete_extension(uuid)
        log.info("VM %s: replica taken over from cluster %s's record (point %s)",
                 record.spec.name, record.relationship.broker,
                 record.points[-1][0] if record.points else "none")  # fmt: skip
        return True

    def drop_stale(self, uuid: str) -> None:
        """A copy this node kept of a replica VM another node holds now (it lost it while
        down): the catalog entries go, the chain's files stay (they are the owner's)."""
        rel = self.catalog.relationship(uuid)
        if rel is None or rel.role is not RelRole.REPLICA or not rel.broker:
            return
        vm = self.catalog.find(uuid)
        if vm is not None and vm.state is not VmState.REPLICA:
            return  # failed over or under test here: not silently dropped
        for point in self.catalog.points(uuid):
            self.catalog.delete_point(uuid, point.id)
        if self.catalog.extension(uuid) is not None:  # its schedule ends on its next look
            self.catalog.delete_extension(uuid)
        self.catalog.delete_relationship(uuid)
        if vm is not None:
            self.catalog.delete(uuid)
        log.info("VM %s: this node's stale copy of the replica dropped (held by another "
                 "node of cluster %s now)", rel.vm_name, rel.broker)  # fmt: skip


def _member_url(entry: Entry | None) -> str:
    if entry is None:
        return ""
    return MemberRecord.from_json(entry.value).url
