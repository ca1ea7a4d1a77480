"""Replication of a clustered VM follows its owner node.

Theory of operation. A clustered VM's replication relationship lives, as
for any VM, in the catalog of the host that runs it (its primary), and the
cycles run there. Two things are added for a cluster:

* **Publication.** Whenever the relationship changes (after each cycle,
  enable, change, pause, a takeover; :class:`RelationshipListener` of
  :class:`~ferry.host.replication.primary.ReplicationService`), the owner
  puts it with its recent cycle history into ``vms/<uuid>/replication``, in
  a transaction that compares the VM's ``owner`` record: only the node the
  store names as owner publishes. The store, not the lost node, is where a
  new owner finds the relationship.
* **The replica learns the cluster.** The replica host cannot read the
  primary cluster's store, so the owner tells it the cluster's member hosts
  with their certificate thumbprints (``PATCH`` with ``cluster`` and
  ``cluster_hosts``) when replication starts and whenever the membership
  changes (checked every :data:`PASS_S`). Each node publishes its own
  certificate's thumbprint as ``identities/<node>``. The replica then accepts
  a claim of the primary's place from any of those hosts, for itself only
  (:func:`ferry.core.replication.check_primary_change`).

When a node gains a VM after a node loss (the HA leader moved ``owner`` by
compare-and-swap, the node's reconciler registered and started the VM, then
called :meth:`ClusterReplication.on_owned`), the new owner **adopts** the
published relationship: :func:`ferry.core.relationship.resumed_by_new_owner`
(pending points and a cycle in flight were files on the lost node, and the
dirty bitmap of a SIGKILLed QEMU is inconsistent: a running relationship
resynchronises by block hashes), claims the primary's place at the replica,
writes the relationship into its catalog with the cycle history, publishes it
(now naming itself), records a ``replication-resumed`` event and schedules
its cycles at the same frequency, the resynchronisation at once. A claim
that fails (replica unreachable) is retried on every pass. The pass also
adopts on its own when a VM this node owns and runs has a published primary
that is another node for longer
than :data:`ADOPT_GRACE_S` (a missed hook, an agent restart, a move whose
handover failed); a live move inside the cluster normally hands the
relationship over itself (:mod:`ferry.host.replication.handover`) within
that time; when the published primary is down (no ``alive/<node>``) there is
nothing to wait for, and the pass adopts at once. A node that finds its own
primary relationship of a VM another node owns, and published by another
primary, drops it (it came back after losing the VM), under the VM's disk
turn so a move's handover finishes first.

The authority is the ownership record in the store; the replica trusts the
hosts of the cluster to claim only what they own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ferry.core.cluster.keys import ROOT, ClusterKeys, cluster_names
from ferry.core.cluster.nodes import MemberRecord
from ferry.core.cluster.roles import Owner
from ferry.core.cluster.store import ClusterStore, Compare, Delete, Put
from ferry.core.relationship import (
    Relationship,
    Role,
    handed_to_new_owner,
    resumed_by_new_owner,
)
from ferry.core.replication import ClusterHost, format_frequency, is_running
from ferry.core.tasks import cancel_and_wait
from ferry.core.vmstate import VmState
from ferry.errors import AuthError, FerryError
from ferry.host.replication.handover import send_pending
from ferry.host.replication.primary import CHANGE_TURN, ReplicationService
from ferry.peer.replication import REPLICA, UPDATE, ReplicaChanges, Takeover

log = logging.getLogger(__name__)

PASS_S = 5.0  # how often membership, publication, adoption and leftovers are checked
ADOPT_GRACE_S = 15.0  # an owned VM published by another primary: adopt after this long
CYCLES_KEPT = 100  # cycle history published with the relationship
LISTENER_TIMEOUT_S = 3.0  # a publication inside a cycle's turn waits no longer for the store
RESUMED = "replication-resumed"  # cluster event kinds (cluster events C)
CLAIM_REFUSED = "replication-claim-refused"
HANDED = "replication-handed"  # to another cluster, after copy-roles


class ClusterNode(Protocol):
    """What this service needs of a membership (``host/cluster/membership.py``)."""

    store: ClusterStore
    keys: ClusterKeys
    cluster: str
    node: str

    async def record_event(self, kind: str, *, vm: str | None = None, node: str | None = None,
                           reason: str = "") -> None: ...  # fmt: skip


class Context(Protocol):
    """The agent's holder of its membership (``ClusterContext``)."""

    @property
    def membership(self) -> ClusterNode | None: ...

    def listen(self, listener: Callable[[ClusterNode | None], Awaitable[None]]) -> None: ...


@dataclass(frozen=True)
class Identity:
    """``identities/<node>``: a node's host certificate, as replicas pin it."""

    name: str
    url: str
    thumbprint: str

    def to_json(self) -> bytes:
        return json.dumps({"name": self.name, "url": self.url,
                           "thumbprint": self.thumbprint}).encode()  # fmt: skip

    @classmethod
    def from_json(cls, raw: bytes) -> Identity:
        data = json.loads(raw)
        return cls(str(data["name"]), str(data.get("url", "")), str(data.get("thumbprint", "")))


class ClusterReplication:
    """This node's side of replicating clustered VMs; see the module docstring."""

    def __init__(self, replication: ReplicationService, context: Context, *, url: str,
                 thumbprint: str, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.replication = replication
        self.context = context
        self.url = url
        self.thumbprint = thumbprint
        self.catalog = replication.catalog
        self.clock = clock
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._published: dict[str, bytes] = {}  # what this node last put, per VM
        self._told: dict[str, tuple[str, tuple[ClusterHost, ...]]] = {}  # what the replica holds
        self._claims: set[str] = set()  # on_owned asked: adopt without waiting
        self._unclaimed: dict[str, float] = {}  # owned here, published by another: since
        self._refused: set[str] = set()  # claims the replica refused (an event once)
        self._warned: dict[str, str] = {}  # the last warning per VM, not repeated every pass
        self._missing: list[str] = []  # members without a published certificate
        self._task: asyncio.Task[None] | None = None

    # -- life ----------------------------------------------------------------------------

    def renewed(self, thumbprint: str) -> None:
        """``pki renew`` installed a new certificate: the next pass rewrites
        ``identities/<node>``, and each owner then tells its replicas the cluster's hosts
        with the new thumbprint (what ``_told`` holds differs, so they are told again)."""
        self.thumbprint = thumbprint

    def start(self) -> None:
        """Listen to replication and membership changes; run the pass every :data:`PASS_S`."""
        self.replication.listeners.append(self)
        self.context.listen(self._membership_changed)
        self._task = asyncio.create_task(self._loop(), name="cluster-replication")

    async def shutdown(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _membership_changed(self, membership: ClusterNode | None) -> None:
        self._told.clear()
        self._published.clear()
        if membership is not None:
            await self.pass_once()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(PASS_S)
            try:
                await self.pass_once()
            except asyncio.CancelledError:
                raise
            except FerryError as exc:
                log.warning("clustered VMs' replication: %s", exc)
            except Exception:
                log.exception("clustered VMs' replication pass failed")

    # -- hooks ---------------------------------------------------------------------------

    async def on_owned(self, vm_uuid: str) -> None:
        """Hook for the node's reconciler: it registered and started clustered VM ``vm_uuid``.

        Adopts the VM's published replication (if it has one) now; a failure is
        logged and the pass retries.
        """
        membership = self.context.membership
        if membership is None:
            return
        self._claims.add(vm_uuid)
        try:
            await self._adopt(membership, vm_uuid)
        except FerryError as exc:
            log.warning("VM %s: replication not resumed here yet: %s", vm_uuid, exc)

    async def on_left(self, vm_uuid: str) -> None:
        """Hook for the node's reconciler, before it drops a VM ``cluster copy-roles``
        gave to another cluster: hand its replication over now (the pass retries)."""
        membership = self.context.membership
        if membership is None:
            return
        try:
            await self._hand_to_cluster(membership, vm_uuid)
        except FerryError as exc:
            log.warning("VM %s: replication not handed to its new cluster yet: %s", vm_uuid, exc)

    async def relationship_changed(self, vm_uuid: str) -> None:
        """Publish (if this node owns the VM). Runs inside a cycle's turn: bounded, never raises;
        a store out of reach only delays the publication to a later pass."""
        membership = self.context.membership
        if membership is None or self.replication.cycles.primary_rel(vm_uuid) is None:
            return
        try:
            async with asyncio.timeout(LISTENER_TIMEOUT_S):
                owner = await self._owner(membership, vm_uuid)
                if owner is not None and owner.node == membership.node:
                    await self._publish(membership, vm_uuid)
                    await self._tell_replica(membership, vm_uuid, await self._hosts(membership))
        except (FerryError, TimeoutError) as exc:
            self._warn(vm_uuid, f"VM {vm_uuid}: replication not published to cluster "
                       f"{membership.cluster} now ({exc or 'no answer in time'}); a later pass "
                       "retries")  # fmt: skip

    async def relationship_removed(self, vm_uuid: str) -> None:
        membership = self.context.membership
        if membership is None:
            return
        try:
            async with asyncio.timeout(LISTENER_TIMEOUT_S):
                await self._unpublish(membership, vm_uuid)
        except (FerryError, TimeoutError) as exc:
            self._warn(vm_uuid, f"VM {vm_uuid}: the removed replication is still published in "
                       f"cluster {membership.cluster} ({exc or 'no answer in time'}); a later "
                       "pass removes it")  # fmt: skip

    async def _unpublish(self, membership: ClusterNode, vm_uuid: str) -> None:
        """Remove the published record if this node owns the VM and no longer replicates it."""
        keys = membership.keys
        async with self._locks[vm_uuid]:
            if self.replication.cycles.primary_rel(vm_uuid) is not None:
                return  # replicated here again (adopted meanwhile)
            entry = await membership.store.get(keys.vm_owner(vm_uuid))
            if entry is None or Owner.decode(entry.value).node != membership.node:
                return
            await membership.store.txn(
                [Compare.unchanged(keys.vm_owner(vm_uuid), entry.mod_revision)],
                [Delete(keys.vm_replication(vm_uuid))])  # fmt: skip
            self._published.pop(vm_uuid, None)
            self._told.pop(vm_uuid, None)

    # -- the pass ------------------------------------------------------------------------

    async def pass_once(self) -> None:
        """One look: identity, the cluster's hosts at each replica, publication, adoption."""
        membership = self.context.membership
        if membership is None:
            return
        await self._put_identity(membership)
        hosts = await self._hosts(membership)
        here = membership.node
        primaries = {r.vm_uuid for r in self.catalog.relationships() if r.role is Role.PRIMARY}
        for vm_uuid in sorted(primaries):
            config = await membership.store.get(membership.keys.vm_config(vm_uuid))
            if config is None and await membership.store.get(membership.keys.vm_left(vm_uuid)):
                await self._hand_to_cluster(membership, vm_uuid)  # copy-roles gave it away
                continue
            if config is None:  # not (or no longer) clustered: standalone at the replica
                await self._tell_replica(membership, vm_uuid, (), cluster="")
                await membership.store.txn(  # a record left by the clustered VM it was
                    [Compare.absent(membership.keys.vm_config(vm_uuid))],
                    [Delete(membership.keys.vm_replication(vm_uuid))])  # fmt: skip
                continue
            owner = await self._owner(membership, vm_uuid)
            if owner is not None and owner.node == here:
                await self._publish(membership, vm_uuid)
                await self._tell_replica(membership, vm_uuid, hosts)
            elif owner is not None:
                await self._drop_if_taken(membership, vm_uuid)
        now = self.clock()
        for record in self.catalog.vms():
            if record.uuid in primaries or record.state is VmState.REPLICA:
                continue
            published = await self._published_primary(membership, record.uuid)
            owner = None if published is None else await self._owner(membership, record.uuid)
            if published is None or owner is None or owner.node != here or owner.pending:
                self._unclaimed.pop(record.uuid, None)
                continue
            if published == here:  # it ended here (removed) while the store was out of reach
                await self._unpublish(membership, record.uuid)
                continue
            if record.state not in (VmState.RUNNING, VmState.PAUSED):
                continue
            since = self._unclaimed.setdefault(record.uuid, now)
            # A published primary that is down (its lease expired) hands nothing over.
            gone = await membership.store.get(membership.keys.alive(published)) is None
            if gone or record.uuid in self._claims or now - since >= ADOPT_GRACE_S:
                try:
                    await self._adopt(membership, record.uuid)
                except FerryError as exc:
                    self._warn(record.uuid, f"VM {record.name}: replication not resumed here "
                               f"yet: {exc}")  # fmt: skip

    # -- pieces --------------------------------------------------------------------------

    async def _owner(self, membership: ClusterNode, vm_uuid: str) -> Owner | None:
        entry = await membership.store.get(membership.keys.vm_owner(vm_uuid))
        return None if entry is None else Owner.decode(entry.value)

    async def _published_primary(self, membership: ClusterNode, vm_uuid: str) -> str | None:
        entry = await membership.store.get(membership.keys.vm_replication(vm_uuid))
        return None if entry is None else Takeover.model_validate_json(entry.value).primary

    async def _put_identity(self, membership: ClusterNode) -> None:
        mine = Identity(membership.node, self.url, self.thumbprint)
        key = membership.keys.identity(membership.node)
        entry = await membership.store.get(key)
        if entry is None or Identity.from_json(entry.value) != mine:
            await membership.store.put(key, mine.to_json())

    async def _hosts(self, membership: ClusterNode) -> tuple[ClusterHost, ...]:
        """The cluster's members whose certificate the store knows, by name."""
        return await self._hosts_of(membership.store, membership.keys)

    async def _hosts_of(self, store: ClusterStore, keys: ClusterKeys) -> tuple[ClusterHost, ...]:
        members = [MemberRecord.from_json(e.value).name for e in await store.range(keys.members)]
        known = {ClusterKeys.last_part(e.key): Identity.from_json(e.value)
                 for e in await store.range(keys.identities)}  # fmt: skip
        missing = sorted(set(members) - set(known))
        if missing and missing != self._missing:  # said once, not every pass
            log.info("cluster %s: no certificate published yet for %s", keys.cluster,
                     ", ".join(missing))  # fmt: skip
        self._missing = missing
        return tuple(ClusterHost(name, known[name].thumbprint)
                     for name in sorted(members) if name in known)  # fmt: skip

    async def _publish(self, membership: ClusterNode, vm_uuid: str) -> bool:
        """Put the relationship into the store if this node still owns the VM (CAS on owner)."""
        async with self._locks[vm_uuid]:
            rel = self.replication.cycles.primary_rel(vm_uuid)
            if rel is None:
                return False
            cycles = self.catalog.cycles(vm_uuid)[-CYCLES_KEPT:]
            doc = Takeover(**rel.model_dump(), cycles=cycles).model_dump_json().encode()
            if self._published.get(vm_uuid) == doc:
                return True
            keys = membership.keys
            owner = await membership.store.get(keys.vm_owner(vm_uuid))
            if owner is None or Owner.decode(owner.value).node != membership.node:
                return False
            result = await membership.store.txn(
                [Compare.unchanged(keys.vm_owner(vm_uuid), owner.mod_revision)],
                [Put(keys.vm_replication(vm_uuid), doc)],
            )
            if result.succeeded:
                self._published[vm_uuid] = doc
            return result.succeeded

    async def _tell_replica(self, membership: ClusterNode, vm_uuid: str,
                            hosts: tuple[ClusterHost, ...], *,
                            cluster: str | None = None) -> None:  # fmt: skip
        """Make the replica hold ``hosts`` of this cluster (``cluster=""``: standalone)."""
        cluster = membership.cluster if cluster is None else cluster
        wanted = (cluster, hosts if cluster else ())
        if self._told.get(vm_uuid) == wanted:
            return
        rel = self.replication.cycles.primary_rel(vm_uuid)
        if rel is None:
            return
        try:
            async with self.replication.peer(rel) as peer:
                if vm_uuid not in self._told:
                    state = await peer.call(REPLICA, uuid=vm_uuid)
                    self._told[vm_uuid] = (state.cluster, tuple(state.cluster_hosts))
                if self._told[vm_uuid] != wanted:
                    change = ReplicaChanges(cluster=cluster, cluster_hosts=list(wanted[1]))
                    await peer.call(UPDATE, change, uuid=vm_uuid)
                    self._told[vm_uuid] = wanted
                    names = ", ".join(h.name for h in wanted[1]) or "nobody"
                    log.info("VM %s: replica host %s accepts a new primary from %s", rel.vm_name,
                             rel.replica, names)  # fmt: skip
        except FerryError as exc:
            self._warn(vm_uuid, f"VM {rel.vm_name}: replica host {rel.replica} not told the "
                       f"hosts of cluster {cluster or '(none)'}: {exc}")  # fmt: skip

    def _warn(self, vm_uuid: str, message: str) -> None:
        if self._warned.get(vm_uuid) != message:
            self._warned[vm_uuid] = message
            log.warning("%s", message)

    async def _adopt(self, membership: ClusterNode, vm_uuid: str) -> bool:
        """Carry on the VM's published replication as its primary (see the module docstring)."""
        here = membership.node
        async with self._locks[vm_uuid]:
            if self.replication.cycles.primary_rel(vm_uuid) is not None:
                self._claims.discard(vm_uuid)
                return False
            owner = await self._owner(membership, vm_uuid)
            entry = await membership.store.get(membership.keys.vm_replication(vm_uuid))
            record = self.catalog.find(vm_uuid)
            if entry is None:
                self._claims.discard(vm_uuid)  # not replicated
                return False
            if (owner is None or owner.node != here or owner.pending
                    or record is None or record.state is VmState.REPLICA):  # fmt: skip
                return False
            published = Takeover.model_validate_json(entry.value)
            before = Relationship.model_validate(published.model_dump(exclude={"cycles"}))
            hosts = await self._hosts(membership)
            handed = await membership.store.get(membership.keys.vm_handed(vm_uuid))
            # A member of this cluster, whether or not its certificate was published
            # (a node lost before its first pass has none in the store).
            members = await membership.store.range(membership.keys.members)
            from_here = before.primary in {MemberRecord.from_json(e.value).name for e in members}
            if handed is None and not from_here:
                # copy-roles carried it from another cluster, whose owner has not handed it
                # over yet: the replica would refuse this node (its pass, then ours, retry).
                self._warn(vm_uuid, f"VM {before.vm_name}: replication waits for "
                           f"{before.primary} of its old cluster to hand it over")  # fmt: skip
                return False
            if handed is not None and handed.value.decode() == before.primary:
                rel = handed_to_new_owner(before, node=here)
            else:
                rel = resumed_by_new_owner(before, node=here)
            claim = ReplicaChanges(primary=here, thumbprint=self.thumbprint,
                                   primary_url=self.url, cluster=membership.cluster,
                                   cluster_hosts=list(hosts))  # fmt: skip
            try:
                async with self.replication.peer(rel) as peer:
                    await peer.call(UPDATE, claim, uuid=vm_uuid)
            except AuthError as exc:
                if vm_uuid not in self._refused:
                    self._refused.add(vm_uuid)
                    reason = f"replica host {rel.replica!r}: {exc}"
                    await membership.record_event(CLAIM_REFUSED, vm=rel.vm_name, node=here,
                                                  reason=reason)  # fmt: skip
                raise
            self._told[vm_uuid] = (membership.cluster, hosts)
            if handed is not None:  # spent: a later adoption (a node loss) resynchronises
                await membership.store.txn(
                    [Compare.unchanged(handed.key, handed.mod_revision)], [Delete(handed.key)]
                )
            self.catalog.put_relationship(rel)
            self.catalog.replace_cycles(vm_uuid, list(published.cycles))
            self._claims.discard(vm_uuid)
            self._unclaimed.pop(vm_uuid, None)
            self._refused.discard(vm_uuid)
        await self._publish(membership, vm_uuid)
        if is_running(rel.state):  # the resynchronisation starts now, then every period
            self.replication.scheduler.wake(vm_uuid)
        else:
            self.replication.scheduler.spawn(vm_uuid)
        what = ("resynchronising by block hashes" if rel.state.value == "resynchronising"
                else "handed over cleanly by the old cluster, its next cycle a delta"
                if handed is not None and rel.state is before.state
                else f"{rel.state.value}, resynchronising once resumed"
                if rel.resume_to is not None and rel.resume_to.value == "resynchronising"
                else rel.state.value)  # fmt: skip
        reason = (f"replication to {rel.replica} resumed here from {before.primary}'s last "
                  f"record (point {before.confirmed_point}); {what}; every "
                  f"{format_frequency(rel.frequency_s)}")  # fmt: skip
        log.info("VM %s: %s", rel.vm_name, reason)
        await membership.record_event(RESUMED, vm=rel.vm_name, node=here, reason=reason)
        return True

    async def _hand_to_cluster(self, membership: ClusterNode, vm_uuid: str) -> None:
        """The VM is in another cluster now (``copy-roles --run``, after a clean stop):
        send the pending points, tell the replica that cluster's hosts, write the
        relationship there with ``vms/<uuid>/handed``, and forget this node's side.

        Done here, by the old primary, because the replica trusts it and the hosts of its
        cluster only: a claim from the new cluster's node would be refused.
        """
        store = membership.store
        if self.replication.cycles.primary_rel(vm_uuid) is None:
            return  # not replicated from here (the usual case)
        target = await _cluster_holding(store, vm_uuid, besides=membership.cluster)
        if target is None:
            return  # not in any cluster's store yet (or any more): the pass looks again
        async with self.replication.turns.turn(vm_uuid, CHANGE_TURN), self._locks[vm_uuid]:
            rel = self.replication.cycles.primary_rel(vm_uuid)
            if rel is None:
                return
            moved = await send_pending(self.replication, rel)
            hosts = await self._hosts_of(store, target)
            async with self.replication.peer(rel) as peer:
                change = ReplicaChanges(cluster=target.cluster, cluster_hosts=list(hosts))
                await peer.call(UPDATE, change, uuid=vm_uuid)
            cycles = self.catalog.cycles(vm_uuid)[-CYCLES_KEPT:]
            doc = Takeover(**moved.model_dump(), cycles=cycles).model_dump_json().encode()
            result = await store.txn(
                [Compare.absent(membership.keys.vm_config(vm_uuid))],
                [Put(target.vm_replication(vm_uuid), doc),
                 Put(target.vm_handed(vm_uuid), membership.node.encode())])  # fmt: skip
            if not result.succeeded:
                return  # it came back meanwhile (--rollback): keep replicating it here
            self.replication.forget(vm_uuid)
            self.catalog.replace_cycles(vm_uuid, [])
            self._published.pop(vm_uuid, None)
            self._told.pop(vm_uuid, None)
        names = ", ".join(h.name for h in hosts) or "nobody yet"
        reason = (f"replication to {rel.replica} handed to cluster {target.cluster} ({names}) "
                  f"after copy-roles; state {moved.state.value}")  # fmt: skip
        log.info("VM %s: %s", rel.vm_name, reason)
        await membership.record_event(HANDED, vm=rel.vm_name, node=membership.node,
                                      reason=reason)  # fmt: skip

    async def _drop_if_taken(self, membership: ClusterNode, vm_uuid: str) -> None:
        """This node's primary side of a VM another node owns and replicates: drop it."""
        published = await self._published_primary(membership, vm_uuid)
        if published is None or published == membership.node:
            return
        turns = self.replication.turns
        async with turns.turn(vm_uuid, CHANGE_TURN), self._locks[vm_uuid]:
            rel = self.replication.cycles.primary_rel(vm_uuid)
            if rel is None:
                return
            self.replication.forget(vm_uuid)
            self._published.pop(vm_uuid, None)
            self._told.pop(vm_uuid, None)
        log.info("VM %s: replication now runs from %s; this node's old record dropped",
                 rel.vm_name, published)  # fmt: skip


async def _cluster_holding(
    store: ClusterStore, vm_uuid: str, *, besides: str
) -> ClusterKeys | None:
    """The cluster (other than ``besides``) whose store has VM ``vm_uuid``'s role."""
    known = cluster_names([e.key for e in await store.range(ROOT) if e.key.endswith("/meta")])
    for name in known:
        keys = ClusterKeys(name)
        if name != besides and await store.get(keys.vm_config(vm_uuid)) is not None:
            return keys
    return None
