"""Replication of a clustered VM follows its owner (host/cluster/replication.py), without QEMU.

Three cluster nodes (real ReplicationServices over FakeVms and real catalogs,
Memberships on one MemoryStore) replicate VM ``web`` to a standalone replica
host (a real ReplicaStore behind the replication peer endpoints), all on the
in-memory peer network, so every call is authorised as over HTTPS. Cycles do
not run: the scheduler is a recorder.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ferry.adapters.catalog import Catalog
from ferry.core.cluster.nodes import MemberRecord
from ferry.core.cluster.records import ClusterMeta
from ferry.core.cluster.roles import Owner, VmRole, Want, encode_role
from ferry.core.cluster.store import Compare, Put
from ferry.core.cluster.timing import ClusterTimings
from ferry.core.relationship import Relationship, Role
from ferry.core.replica_server import AllowEntry, ReplicaServerSettings
from ferry.core.replication import ClusterHost, CycleKind, CycleRecord, ReplicationState
from ferry.core.spec import DiskSpec, VmSpec
from ferry.core.vmstate import VmState
from ferry.errors import AuthError
from ferry.host.cluster.membership import ClusterContext, Membership
from ferry.host.cluster.replication import (
    ADOPT_GRACE_S,
    CLAIM_REFUSED,
    RESUMED,
    ClusterReplication,
    Identity,
)
from ferry.host.config import HostConfig
from ferry.host.jobs import JobRegistry
from ferry.host.replication.endpoints import ReplicationEndpoints
from ferry.host.replication.primary import ReplicationService
from ferry.host.replication.receiver import ReplicaStore
from ferry.host.replication.server import ReplicaServer
from ferry.host.turns import DiskTurns
from ferry.peer.replication import REPLICA, UPDATE, ReplicaChanges, Takeover
from ferry.peer.server import PeerServer
from ferry.testing.peers import MemoryNetwork, host_cert
from ferry.testing.store import MemoryStore
from ferry.testing.vms import FakeVms

UUID = "c1c1c1c1-0000-4000-8000-000000000001"
NODES = ("node-1", "node-2", "node-3")
REPLICA_HOST = "host-4"
S = ReplicationState


class Recorder:
    """The cycle scheduler, recording instead of running cycles."""

    def __init__(self) -> None:
        self.spawned: list[str] = []
        self.woken: list[str] = []  # a cycle now
        self.cancelled: list[str] = []

    def spawn(self, key: str) -> None:
        self.spawned.append(key)

    def cancel(self, key: str) -> None:
        self.cancelled.append(key)

    def wake(self, key: str) -> None:
        self.woken.append(key)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Node:
    name: str
    catalog: Catalog
    replication: ReplicationService
    scheduler: Recorder
    context: ClusterContext
    service: ClusterReplication
    clock: Clock

    def rel(self) -> Relationship | None:
        return self.catalog.relationship(UUID)


@dataclasses.dataclass
class World:
    network: MemoryNetwork
    store: MemoryStore
    nodes: dict[str, Node]
    replica: Catalog
    leases: dict[str, int]

    def replica_rel(self) -> Relationship:
        rel = self.replica.relationship(UUID)
        assert rel is not None
        return rel

    def thumbprint(self, name: str) -> str:
        return self.network.certs[name].thumbprint

    async def published(self) -> Takeover | None:
        keys = self.nodes["node-1"].context.membership.keys  # type: ignore[union-attr]
        entry = await self.store.get(keys.vm_replication(UUID))
        return None if entry is None else Takeover.model_validate_json(entry.value)

    async def move_owner(self, to: str) -> None:
        """What the HA leader does after the owner's lease expired: CAS on owner."""
        keys = self.nodes[to].context.membership.keys  # type: ignore[union-attr]
        entry = await self.store.get(keys.vm_owner(UUID))
        assert entry is not None
        key = keys.vm_owner(UUID)
        result = await self.store.txn([Compare.unchanged(key, entry.mod_revision)],
                                      [Put(key, Owner.settled(to).encode())])  # fmt: skip
        assert result.succeeded

    async def lose(self, name: str) -> None:
        """Node ``name`` is lost: its lease expires (its alive key goes)."""
        self.store.expire(self.leases[name])

    def register_running(self, name: str) -> None:
        """What the new owner's reconciler does: the VM is in its catalog and runs."""
        self.nodes[name].catalog.add_vm(_spec(), VmState.RUNNING)

    async def events(self, kind: str) -> list[dict[str, Any]]:
        import json

        keys = self.nodes["node-1"].context.membership.keys  # type: ignore[union-attr]
        found = [json.loads(e.value) for e in await self.store.range(keys.events)]
        return [e for e in found if e["kind"] == kind]


def _spec() -> VmSpec:
    disk = DiskSpec(path=f"/csv1/{UUID}/disk0.qcow2", size=1 << 20, format="qcow2")
    return VmSpec(uuid=UUID, name="web", config_version=1, memory=1 << 27, disks=(disk,))


def _replica_host(network: MemoryNetwork, root: Path) -> Catalog:
    config = HostConfig(name=REPLICA_HOST, data_dir=root / REPLICA_HOST, tls_dir=root / "tls")
    config.data_dir.mkdir(parents=True)
    catalog = Catalog(config.data_dir)
    server_rules = ReplicaServer(catalog, host=REPLICA_HOST)
    server_rules.configure(ReplicaServerSettings(enabled=True, storage=str(root / "replicas"),
                                                 allow=(AllowEntry(pattern="*"),)))  # fmt: skip
    store = ReplicaStore(config, catalog, server_rules)
    server = PeerServer()

    async def no_takeover(*_: Any) -> Any:
        raise AuthError("no takeover here")

    ReplicationEndpoints(store, mover=None, adopt=no_takeover).register(server)  # type: ignore[arg-type]
    network.join(REPLICA_HOST, server)
    storage = root / "replicas" / UUID
    storage.mkdir(parents=True)
    catalog.add_vm(store.replica_spec(_spec(), storage, None), VmState.REPLICA)
    catalog.put_relationship(Relationship(
        vm_uuid=UUID, vm_name="web", role=Role.REPLICA, primary="node-1", replica=REPLICA_HOST,
        state=S.REPLICATING, thumbprint=host_cert("node-1").thumbprint, storage=str(storage),
        primary_url="https://node-1"))  # fmt: skip
    return catalog


async def _node(network: MemoryNetwork, store: MemoryStore, root: Path, name: str,
                lease: int) -> Node:  # fmt: skip
    config = HostConfig(name=name, data_dir=root / name, tls_dir=root / "tls")
    config.data_dir.mkdir(parents=True)
    catalog = Catalog(config.data_dir)
    vms = FakeVms(config, catalog)
    vms.turns = DiskTurns()  # type: ignore[attr-defined]
    jobs = JobRegistry(catalog)
    replica_store = ReplicaStore(config, catalog, ReplicaServer(catalog, host=name))
    replication = ReplicationService(vms, jobs, replica_store, network.connector(name))  # type: ignore[arg-type]
    recorder = Recorder()
    replication.scheduler = recorder  # type: ignore[assignment]
    network.join(name, PeerServer())
    member = MemberRecord(name=name, url=f"https://{name}", version="1", functional_level=3,
                          joined=0.0)  # fmt: skip
    membership = Membership(store, cluster="c1", node=name, lease=lease,
                            timings=ClusterTimings.from_ttl(4), member=member,
                            meta=ClusterMeta("c1", 0.0, 3))  # fmt: skip
    await membership.put_member(member)
    await membership.put_alive()
    context = ClusterContext(membership)
    clock = Clock()
    thumbprint = network.certs[name].thumbprint
    service = ClusterReplication(replication, context, url=f"https://{name}",
                                 thumbprint=thumbprint, clock=clock)  # fmt: skip
    replication.listeners.append(service)
    return Node(name, catalog, replication, recorder, context, service, clock)


async def _world(tmp_path: Path) -> World:
    network = MemoryNetwork()
    store = MemoryStore()
    replica = _replica_host(network, tmp_path)
    leases = {name: await store.grant(4) for name in NODES}
    nodes = {name: await _node(network, store, tmp_path, name, leases[name]) for name in NODES}
    # VM web: clustered in c1, owned by node-1 where it runs, replicated to host-4.
    keys = nodes["node-1"].context.membership.keys  # type: ignore[union-attr]
    await store.put(keys.vm_config(UUID), encode_role(VmRole(spec=_spec(), volume="csv1")))
    await store.put(keys.vm_owner(UUID), Owner.settled("node-1").encode())
    await store.put(keys.vm_want(UUID), Want.RUNNING.value.encode())
    one = nodes["node-1"]
    one.catalog.add_vm(_spec(), VmState.RUNNING)
    one.catalog.put_relationship(Relationship(
        vm_uuid=UUID, vm_name="web", role=Role.PRIMARY, primary="node-1", replica=REPLICA_HOST,
        replica_url=f"https://{REPLICA_HOST}", state=S.REPLICATING, frequency_s=30,
        recovery_points=3, thumbprint=network.certs[REPLICA_HOST].thumbprint,
        next_point=6, confirmed_point=5, last_started=time.time()))  # fmt: skip
    one.catalog.add_cycle(UUID, CycleRecord(time.time() - 30, True, CycleKind.SUCCESS, 4096, 0.2))
    one.catalog.add_cycle(UUID, CycleRecord(time.time(), True, CycleKind.SUCCESS, 8192, 0.3))
    return World(network, store, nodes, replica, leases)


def with_world(body: Callable[[World], Awaitable[None]]) -> Callable[[Path], None]:
    """A test over a fresh world (no async test plugin here: one asyncio.run each)."""

    def test(tmp_path: Path) -> None:
        async def main() -> None:
            await body(await _world(tmp_path))

        asyncio.run(main())

    test.__name__, test.__doc__ = body.__name__, body.__doc__
    return test


async def _settle(world: World) -> None:
    """Every node publishes its identity, then the owner tells the replica the hosts."""
    for name in NODES:
        await world.nodes[name].service.pass_once()
    await world.nodes["node-1"].service.pass_once()


@with_world
async def test_the_owner_publishes_and_the_replica_learns_the_cluster(world: World) -> None:
    await _settle(world)
    published = await world.published()
    assert published is not None
    assert (published.primary, published.confirmed_point, published.frequency_s) == (
        "node-1", 5, 30)  # fmt: skip
    assert [c.bytes for c in published.cycles] == [4096, 8192]
    replica = world.replica_rel()
    assert replica.primary == "node-1" and replica.cluster == "c1"
    assert replica.cluster_hosts == tuple(ClusterHost(n, world.thumbprint(n)) for n in NODES)
    # The replica says what it holds, so an owner after a restart compares with the truth.
    async with world.network.connector("node-1").connect(
        REPLICA_HOST, "", pin=world.thumbprint(REPLICA_HOST)
    ) as peer:
        state = await peer.call(REPLICA, uuid=UUID)
    assert state.cluster == "c1" and [h.name for h in state.cluster_hosts] == list(NODES)


@with_world
async def test_a_change_is_published_and_only_by_the_owner(world: World) -> None:
    await _settle(world)
    one, two = world.nodes["node-1"], world.nodes["node-2"]
    rel = one.rel()
    assert rel is not None
    one.catalog.put_relationship(rel.model_copy(update={"confirmed_point": 7}))
    await one.replication.changed(UUID)
    assert (await world.published()).confirmed_point == 7  # type: ignore[union-attr]
    # node-2 holds a stale copy but does not own the VM: the store keeps node-1's.
    two.catalog.put_relationship(rel.model_copy(update={"primary": "node-2",
                                                        "confirmed_point": 1}))  # fmt: skip
    await two.replication.changed(UUID)
    published = await world.published()
    assert published is not None and (published.primary, published.confirmed_point) == (
        "node-1", 7)  # fmt: skip


@with_world
async def test_membership_changes_reach_the_replica(world: World) -> None:
    await _settle(world)
    one = world.nodes["node-1"]
    keys = one.context.membership.keys  # type: ignore[union-attr]
    # node-3 leaves the cluster: it may no longer claim the VM.
    await world.store.delete(keys.member("node-3"))
    await one.service.pass_once()
    assert [h.name for h in world.replica_rel().cluster_hosts] == ["node-1", "node-2"]
    async with world.network.connector("node-3").connect(REPLICA_HOST, "") as peer:
        claim = ReplicaChanges(primary="node-3", thumbprint=world.thumbprint("node-3"))
        with pytest.raises(AuthError, match="nor a host of its cluster 'c1'"):
            await peer.call(UPDATE, claim, uuid=UUID)
    assert world.replica_rel().primary == "node-1"


@with_world
async def test_after_a_node_loss_the_new_owner_resumes_with_a_resync(world: World) -> None:
    await _settle(world)
    before_events = await world.events(RESUMED)
    await world.lose("node-1")
    await world.move_owner("node-2")
    world.register_running("node-2")
    two = world.nodes["node-2"]
    await two.service.on_owned(UUID)

    rel = two.rel()
    assert rel is not None and rel.role is Role.PRIMARY
    assert (rel.primary, rel.state, rel.frequency_s, rel.recovery_points) == (
        "node-2", S.RESYNCHRONISING, 30, 3)  # fmt: skip
    assert rel.next_point == 6 and rel.pending == () and rel.in_flight is None
    assert rel.thumbprint == world.thumbprint(REPLICA_HOST)  # still pins the replica
    assert [c.bytes for c in two.catalog.cycles(UUID)] == [4096, 8192]  # history carried on
    assert two.scheduler.woken == [UUID]  # the resynchronisation starts now
    replica = world.replica_rel()
    assert (replica.primary, replica.thumbprint, replica.primary_url) == (
        "node-2", world.thumbprint("node-2"), "https://node-2")  # fmt: skip
    published = await world.published()
    assert published is not None and published.primary == "node-2"
    events = await world.events(RESUMED)
    assert len(events) == len(before_events) + 1
    assert events[-1]["node"] == "node-2" and events[-1]["vm"] == "web"
    assert "resynchronising by block hashes" in events[-1]["reason"]
    assert "every 30s" in events[-1]["reason"]
    # A second call (the reconciler again, or the pass) changes nothing.
    await two.service.on_owned(UUID)
    await two.service.pass_once()
    assert two.scheduler.woken == [UUID] and two.scheduler.spawned == []
    assert len(await world.events(RESUMED)) == len(events)

    # node-1 comes back with its old record: it drops it and never cycles again.
    one = world.nodes["node-1"]
    await one.service.pass_once()
    assert one.rel() is None
    # The replica now answers only node-2 as primary; node-1 cannot read it.
    async with world.network.connector("node-1").connect(REPLICA_HOST, "") as peer:
        with pytest.raises(AuthError, match="is not the primary"):
            await peer.call(REPLICA, uuid=UUID)


@with_world
async def test_the_pass_adopts_at_once_when_the_published_primary_is_down(world: World) -> None:
    await _settle(world)
    await world.lose("node-1")
    await world.move_owner("node-3")
    world.register_running("node-3")
    three = world.nodes["node-3"]
    await three.service.pass_once()  # no hook called: the pass sees it
    assert three.rel() is not None and world.replica_rel().primary == "node-3"


@with_world
async def test_the_pass_waits_while_the_published_primary_lives(world: World) -> None:
    """A live move hands replication over itself; the pass gives it time first."""
    await _settle(world)
    await world.move_owner("node-2")  # node-1 alive: as at a move's switch-over
    world.register_running("node-2")
    two = world.nodes["node-2"]
    await two.service.pass_once()
    assert two.rel() is None and world.replica_rel().primary == "node-1"
    two.clock.now += ADOPT_GRACE_S - 1
    await two.service.pass_once()
    assert two.rel() is None
    two.clock.now += 2  # the handover never came: adopt
    await two.service.pass_once()
    assert two.rel() is not None and world.replica_rel().primary == "node-2"


@with_world
async def test_a_replica_that_does_not_know_the_cluster_refuses_and_nothing_changes(
    world: World,
) -> None:
    # The owner never told the replica the cluster (no pass ran before the loss).
    one = world.nodes["node-1"]
    await one.replication.changed(UUID)  # published, but ...
    replica = world.replica_rel()
    replica = replica.model_copy(update={"cluster": "", "cluster_hosts": ()})
    world.replica.put_relationship(replica)
    await world.lose("node-1")
    await world.move_owner("node-2")
    world.register_running("node-2")
    two = world.nodes["node-2"]
    await two.service.on_owned(UUID)
    assert two.rel() is None and two.scheduler.spawned == two.scheduler.woken == []
    assert world.replica_rel() == replica
    assert (await world.published()).primary == "node-1"  # type: ignore[union-attr]
    refused = await world.events(CLAIM_REFUSED)
    assert len(refused) == 1 and "is not the primary" in refused[0]["reason"]
    await two.service.pass_once()  # retried, refused again, one event only
    assert len(await world.events(CLAIM_REFUSED)) == 1


@with_world
async def test_a_vm_leaving_the_cluster_is_standalone_again_at_the_replica(world: World) -> None:
    await _settle(world)
    one = world.nodes["node-1"]
    keys = one.context.membership.keys  # type: ignore[union-attr]
    await world.store.delete(keys.vm_config(UUID))  # cluster vm remove
    await world.store.delete(keys.vm_owner(UUID))
    await one.service.pass_once()
    replica = world.replica_rel()
    assert (replica.cluster, replica.cluster_hosts, replica.primary) == ("", (), "node-1")
    assert await world.published() is None
    async with world.network.connector("node-2").connect(REPLICA_HOST, "") as peer:
        claim = ReplicaChanges(primary="node-2", thumbprint=world.thumbprint("node-2"))
        with pytest.raises(AuthError, match="is not the primary of VM 'web'"):
            await peer.call(UPDATE, claim, uuid=UUID)


@with_world
async def test_removing_replication_removes_the_published_record(world: World) -> None:
    await _settle(world)
    one = world.nodes["node-1"]
    assert await world.published() is not None
    await one.service.relationship_removed(UUID)  # while it is still replicated here
    assert await world.published() is not None
    one.catalog.delete_relationship(UUID)  # what ReplicationService.remove does first
    await one.replication.changed(UUID, removed=True)
    assert await world.published() is None


@with_world
async def test_each_node_publishes_its_certificate(world: World) -> None:
    await _settle(world)
    import json

    keys = world.nodes["node-1"].context.membership.keys  # type: ignore[union-attr]
    found = {json.loads(e.value)["name"]: json.loads(e.value)
             for e in await world.store.range(keys.identities)}  # fmt: skip
    assert found == {n: {"name": n, "url": f"https://{n}", "thumbprint": world.thumbprint(n)}
                     for n in NODES}  # fmt: skip


@with_world
async def test_a_store_out_of_reach_delays_publication_and_stops_nothing(world: World) -> None:
    await _settle(world)
    one = world.nodes["node-1"]
    rel = one.rel()
    assert rel is not None
    one.catalog.put_relationship(rel.model_copy(update={"confirmed_point": 8}))
    world.store.set_available(False)
    await one.replication.changed(UUID)  # inside a cycle's turn: returns, raises nothing
    await one.replication.changed(UUID, removed=False)
    world.store.set_available(True)
    assert (await world.published()).confirmed_point == 5  # type: ignore[union-attr]
    await one.service.pass_once()  # the next pass catches up
    assert (await world.published()).confirmed_point == 8  # type: ignore[union-attr]


@with_world
async def test_a_removal_the_store_missed_is_unpublished_by_the_next_pass(world: World) -> None:
    """Else a later node loss would bring back a replication the admin removed."""
    await _settle(world)
    one = world.nodes["node-1"]
    world.store.set_available(False)
    one.catalog.delete_relationship(UUID)  # replication remove, while etcd is away
    await one.replication.changed(UUID, removed=True)
    world.store.set_available(True)
    assert await world.published() is not None
    await one.service.pass_once()
    assert await world.published() is None
    # A node loss now resumes nothing.
    await world.lose("node-1")
    await world.move_owner("node-2")
    world.register_running("node-2")
    two = world.nodes["node-2"]
    await two.service.on_owned(UUID)
    await two.service.pass_once()
    assert two.rel() is None and world.replica_rel().primary == "node-1"


@with_world
async def test_a_renewed_node_certificate_reaches_etcd_and_the_replica(world: World) -> None:
    """``pki renew`` on node-2: its identity record and the replica's pins follow."""
    await _settle(world)
    new = "ab" * 32
    world.nodes["node-2"].service.renewed(new)
    await _settle(world)
    keys = world.nodes["node-1"].context.membership.keys  # type: ignore[union-attr]
    entry = await world.store.get(keys.identity("node-2"))
    assert entry is not None and Identity.from_json(entry.value).thumbprint == new
    hosts = {h.name: h.thumbprint for h in world.replica_rel().cluster_hosts}
    assert hosts["node-2"] == new and hosts["node-1"] == world.thumbprint("node-1")
