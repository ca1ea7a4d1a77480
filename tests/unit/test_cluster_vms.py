"""Clustered VMs on a MemoryStore: create, add, remove, the reconciler, moves, drain, levels.

The VM service is the real one over a real catalog; nothing here starts a
QEMU (a move's QEMUs are the scripted models of ``test_move_phases``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.core.cluster.nodes import AliveRecord, MemberRecord
from ferry.core.cluster.reconcile import Action
from ferry.core.cluster.records import ClusterMeta, VolumeRecord
from ferry.core.cluster.roles import Owner, Priority, VmRole, Want, encode_role
from ferry.core.cluster.store import Compare, Put
from ferry.core.cluster.timing import ClusterTimings
from ferry.core.migration import Phase, Storage
from ferry.core.spec import DiskSpec, VmSpec
from ferry.core.vmstate import VmOp, VmState
from ferry.errors import (
    ConflictError,
    FerryError,
    InvalidInputError,
    NoPlacementError,
    NotFoundError,
    StateError,
    VersionError,
)
from ferry.host import jobs as jobs_module
from ferry.host.cluster.maintenance import Maintenance
from ferry.host.cluster.membership import ClusterContext, Membership
from ferry.host.cluster.reconciler import Reconciler
from ferry.host.cluster.switchover import OwnerHandover
from ferry.host.cluster.vms import ClusterVms
from ferry.host.vms.requests import NewVm
from ferry.testing.peers import MemoryNetwork
from ferry.testing.store import MemoryStore
from tests.unit.test_move_phases import (
    Lab,
    _destination_cannot_load,
    assert_back_on_source,
    make_host,
    run_move,
)

M = 1024**2
CLUSTER = "c1"


async def seed(store: MemoryStore, volume: Path, nodes: dict[str, tuple[int, int]],
               level: int = 2) -> None:  # fmt: skip
    """Meta, volume csv1 and nodes name -> (functional level, free memory), all alive."""
    m = Membership(store, cluster=CLUSTER, node="seed", lease=0,
                   timings=ClusterTimings.from_ttl(10),
                   member=MemberRecord("seed", "", "", level, 0.0),
                   meta=ClusterMeta(CLUSTER, 0.0, level))  # fmt: skip
    await store.put(m.keys.meta, ClusterMeta(CLUSTER, 0.0, level).to_json())
    await store.put(m.keys.volume("csv1"), VolumeRecord("csv1", str(volume)).to_json())
    for name, (node_level, free) in nodes.items():
        member = MemberRecord(name, f"https://{name}", "0", node_level, 0.0)
        await store.put(m.keys.member(name), member.to_json())
        lease = await store.grant(60)
        await store.put(m.keys.alive(name), AliveRecord(name, free, 0.0).to_json(), lease=lease)


def membership(store: MemoryStore, node: str, level: int = 2) -> Membership:
    return Membership(store, cluster=CLUSTER, node=node, lease=0,
                      timings=ClusterTimings.from_ttl(10),
                      member=MemberRecord(node, f"https://{node}", "0", level, 0.0),
                      meta=ClusterMeta(CLUSTER, 0.0, level))  # fmt: skip


def snapshot(store: MemoryStore) -> dict[str, bytes]:
    return {e.key: e.value for e in asyncio.run(store.range("/"))}


class Node:
    """One host of the lab as a cluster node: its ClusterVms over the shared store."""

    def __init__(self, lab: Lab, host: str, store: MemoryStore) -> None:
        self.host = lab.one if host == "host-1" else lab.two
        self.context = ClusterContext(membership(store, host))
        self.cvms = ClusterVms(self.context, self.host.vms)
        self.reconciler = Reconciler(self.cvms, self.host.migrations, self.host.jobs)
        self.maintenance = Maintenance(self.cvms, self.host.migrations, self.host.jobs)

    @property
    def m(self) -> Membership:
        assert self.context.membership is not None
        return self.context.membership


@pytest.fixture
def cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Lab, MemoryStore, Node, Node]]:
    """Two hosts of test_move_phases' lab as nodes of c1, with a third that is only a record."""
    monkeypatch.setattr(jobs_module, "PERSIST_EVERY_S", 0.0)
    shared = tmp_path / "shared"
    shared.mkdir()
    network = MemoryNetwork()
    lab = Lab(network, make_host(network, tmp_path, "host-1", shared=shared),
              make_host(network, tmp_path, "host-2", shared=shared), tmp_path)  # fmt: skip
    store = MemoryStore()
    free = {"host-1": (2, 1024 * M), "host-2": (3, 2048 * M), "host-3": (3, 512 * M)}
    asyncio.run(seed(store, shared, free))
    yield lab, store, Node(lab, "host-1", store), Node(lab, "host-2", store)
    lab.one.catalog.close()
    lab.two.catalog.close()


def role_on_volume(lab: Lab, name: str = "roamer", uuid: str = "roamer-0000-uuid") -> VmSpec:
    where = lab.root / "shared" / uuid
    where.mkdir(parents=True, exist_ok=True)
    (where / "disk0.qcow2").write_bytes(b"qcow2")
    disk = DiskSpec(path=str(where / "disk0.qcow2"), size=M, direct=True)
    return VmSpec(uuid=uuid, name=name, config_version=2, memory=128 * M, disks=(disk,))


async def put_role(store: MemoryStore, spec: VmSpec, owner: str, want: Want,
                   priority: Priority = Priority.MEDIUM) -> None:  # fmt: skip
    m = membership(store, "x")
    role = VmRole(spec=spec, volume="csv1", priority=priority)
    await store.put(m.keys.vm_config(spec.uuid), encode_role(role))
    await store.put(m.keys.vm_owner(spec.uuid), Owner.settled(owner).encode())
    await store.put(m.keys.vm_want(spec.uuid), want.value.encode())
    await store.put(m.keys.name(spec.name), spec.uuid.encode())


def owner_of(store: MemoryStore, uuid: str) -> Owner:
    entry = asyncio.run(store.get(membership(store, "x").keys.vm_owner(uuid)))
    assert entry is not None
    return Owner.decode(entry.value)


# -- create ---------------------------------------------------------------------------


def test_create_places_on_the_node_with_most_free_memory(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    record, owner = asyncio.run(one.cvms.create(NewVm("web", memory=256 * M, volume="csv1"),
                                                cluster=CLUSTER, priority=Priority.HIGH,
                                                host=None))  # fmt: skip
    assert owner == "host-2"  # host-3 has less free; host-2 the most
    keys = one.m.keys
    data = snapshot(store)
    role = VmRole.model_validate_json(data[keys.vm_config(record.uuid)])
    assert role.priority is Priority.HIGH and role.volume == "csv1"
    assert role.spec.config_version == 2  # the cluster's level
    assert Owner.decode(data[keys.vm_owner(record.uuid)]).node == "host-2"
    assert data[keys.vm_want(record.uuid)] == b"off"
    assert data[keys.name("web")] == record.uuid.encode()
    assert lab.one.catalog.find("web") is None  # host-2's reconciler registers it
    assert "csv1" in lab.one.catalog.volumes()
    # host-2 registers it on its next pass
    two = Node(lab, "host-2", store)
    assert asyncio.run(two.reconciler.pass_once(two.m)) == [(record.uuid, Action.REGISTER)]
    assert lab.two.catalog.find("web") is not None
    assert two.cvms.cluster_of(record.uuid) == CLUSTER


def test_create_on_a_named_host_and_refusals_change_nothing(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    record, owner = asyncio.run(one.cvms.create(NewVm("db", volume="csv1"), cluster=CLUSTER,
                                                priority=Priority.LOW, host="host-1"))  # fmt: skip
    assert owner == "host-1" and lab.one.catalog.find("db") is not None
    before = snapshot(store)
    vms_before = [r.name for r in lab.one.catalog.vms()]
    refusals = [
        (NewVm("x", volume="csv1"), "nope", None, NotFoundError,
         "unknown cluster 'nope': host 'host-1' is a node of cluster 'c1'"),
        (NewVm("x", volume="csv9"), CLUSTER, None, NotFoundError,
         "cluster 'c1' has no volume 'csv9' (volumes: csv1)"),
        (NewVm("x"), CLUSTER, None, InvalidInputError, "a clustered VM needs --volume"),
        (NewVm("db", volume="csv1"), CLUSTER, None, ConflictError,
         "cluster 'c1' already has a VM named 'db'"),
        (NewVm("x", memory=4096 * M, volume="csv1"), CLUSTER, None, NoPlacementError,
         "cannot place VM 'x' (4G, configuration version 2): host-1 has 1G free; "
         "host-2 has 2G free; host-3 has 512M free"),
        (NewVm("x", volume="csv1", config_version=3), CLUSTER, "host-1", NoPlacementError,
         "host-1 runs functional level 2"),
    ]  # fmt: skip
    for new, name, host, error, message in refusals:
        with pytest.raises(error) as caught:
            asyncio.run(one.cvms.create(new, cluster=name, priority=Priority.MEDIUM, host=host))
        assert message in str(caught.value) and "\n" not in str(caught.value)
    assert snapshot(store) == before
    assert [r.name for r in lab.one.catalog.vms()] == vms_before
    assert sorted(p.name for p in (lab.root / "shared").iterdir()) == [record.uuid]


def test_two_concurrent_creates_of_one_name_one_wins(cluster: tuple) -> None:
    lab, store, one, two = cluster

    async def both() -> list[object]:
        return await asyncio.gather(
            one.cvms.create(NewVm("twin", volume="csv1"), cluster=CLUSTER,
                            priority=Priority.MEDIUM, host="host-1"),
            two.cvms.create(NewVm("twin", volume="csv1"), cluster=CLUSTER,
                            priority=Priority.MEDIUM, host="host-2"),
            return_exceptions=True)  # fmt: skip

    results = asyncio.run(both())
    errors = [r for r in results if isinstance(r, FerryError)]
    assert len(errors) == 1 and isinstance(errors[0], ConflictError)
    names = [k for k in snapshot(store) if k.endswith("/names/twin")]
    assert len(names) == 1
    assert len([r for r in lab.one.catalog.vms() + lab.two.catalog.vms() if r.name == "twin"]) == 1
    assert len(list((lab.root / "shared").iterdir())) == 1  # the loser's files are gone


# -- add and remove -------------------------------------------------------------------


def test_add_refuses_a_disk_outside_a_cluster_volume(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    local = lab.one.vms.vm_dir("local-uuid")
    local.mkdir(parents=True)
    disk = DiskSpec(path=str(local / "disk0.qcow2"), size=M)
    lab.one.catalog.add_vm(VmSpec(uuid="local-uuid", name="loner", config_version=2,
                                  memory=128 * M, disks=(disk,)))  # fmt: skip
    before = snapshot(store)
    with pytest.raises(InvalidInputError) as caught:
        asyncio.run(one.cvms.add(CLUSTER, "loner", priority=Priority.MEDIUM))
    assert str(caught.value) == (
        f"VM 'loner' cannot join cluster 'c1': disk {disk.path} is on no cluster volume "
        f"(volumes: csv1 at {lab.root / 'shared'}); move its disks there first"
    )
    assert snapshot(store) == before and one.cvms.cluster_of("local-uuid") is None


def test_add_then_remove(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    spec = role_on_volume(lab)
    kernel = lab.root / "vmlinuz"
    kernel.write_bytes(b"K")
    lab.one.catalog.add_vm(spec.model_copy(update={"kernel": str(kernel)}))
    record = asyncio.run(one.cvms.add(CLUSTER, "roamer", priority=Priority.HIGH))
    assert one.cvms.cluster_of(spec.uuid) == CLUSTER
    assert record.spec.kernel == str(lab.root / "shared" / spec.uuid / "kernel")  # on the volume
    assert owner_of(store, spec.uuid).node == "host-1"
    assert json.loads(lab.one.catalog.setting("cluster_vms") or "{}") == {spec.uuid: CLUSTER}
    with pytest.raises(ConflictError, match="already in cluster 'c1'"):
        asyncio.run(one.cvms.add(CLUSTER, "roamer", priority=Priority.HIGH))
    asyncio.run(one.cvms.remove(CLUSTER, "roamer"))
    assert not [k for k in snapshot(store) if spec.uuid in k or k.endswith("/names/roamer")]
    assert lab.one.catalog.find("roamer") is not None  # a plain VM again
    assert one.cvms.cluster_of(spec.uuid) is None


# -- the reconciler -------------------------------------------------------------------


def test_the_reconciler_drops_what_another_node_owns_and_never_starts_a_pending_move(
    cluster: tuple,
) -> None:
    lab, store, one, two = cluster
    spec = role_on_volume(lab)
    asyncio.run(put_role(store, spec, "host-2", Want.OFF))
    lab.one.catalog.add_vm(spec)
    one.cvms.mark(spec.uuid, CLUSTER)
    assert asyncio.run(one.reconciler.pass_once(one.m)) == [(spec.uuid, Action.FORGET)]
    assert lab.one.catalog.find(spec.uuid) is None
    assert (lab.root / "shared" / spec.uuid / "disk0.qcow2").is_file()  # disks stay
    # A pending move to host-1 from host-2: host-1 starts nothing while host-2 lives.
    key = one.m.keys.vm_owner(spec.uuid)
    pending = Owner.moving("host-1", source="host-2", move="j1")
    asyncio.run(store.put(key, pending.encode()))
    asyncio.run(store.put(one.m.keys.vm_want(spec.uuid), b"running"))
    assert asyncio.run(one.reconciler.pass_once(one.m)) == []
    # host-2 (the source) neither runs nor moves it: it lets host-1 have it.
    assert asyncio.run(two.reconciler.pass_once(two.m)) == [(spec.uuid, Action.RELEASE)]
    assert owner_of(store, spec.uuid) == Owner(
        node="host-1", since=owner_of(store, spec.uuid).since
    )


def test_a_node_without_its_lease_starts_nothing(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    spec = role_on_volume(lab)
    asyncio.run(put_role(store, spec, "host-1", Want.RUNNING))
    asyncio.run(store.delete(one.m.keys.alive("host-1")))
    assert asyncio.run(one.reconciler.pass_once(one.m)) == [(spec.uuid, Action.REGISTER)]
    record = lab.one.catalog.find(spec.uuid)
    assert record is not None and record.state is VmState.OFF


# -- moves inside the cluster -----------------------------------------------------------


def clustered_vm(lab: Lab, store: MemoryStore, one: Node) -> str:
    lab.boot(shared=True)
    spec = lab.one.catalog.get("roamer").spec
    asyncio.run(put_role(store, spec, "host-1", Want.RUNNING))
    one.cvms.mark(spec.uuid, CLUSTER)
    lab.one.migrations.switch_guard = OwnerHandover(one.cvms)
    return spec.uuid


def test_a_move_hands_ownership_over_at_the_switch_over(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    uuid = clustered_vm(lab, store, one)
    guard = lab.one.migrations.switch_guard
    assert isinstance(guard, OwnerHandover)
    seen: list[tuple[Owner, bool]] = []
    settle = guard.after_switch

    async def after_switch(vm_uuid: str, target: str, job: str, *, resumed: bool) -> bool:
        entry = await store.get(one.m.keys.vm_owner(uuid))
        assert entry is not None
        seen.append((Owner.decode(entry.value), resumed))
        return await settle(vm_uuid, target, job, resumed=resumed)

    guard.after_switch = after_switch  # type: ignore[method-assign]
    storage = asyncio.run(one.cvms.check_move("roamer", "host-2", Storage.AUTO))
    assert storage is Storage.SHARED
    job = run_move(lab, storage=storage)
    assert job.state == Phase.DONE, job.detail["error"]
    # While the destination resumed, the owner was pending host-1 -> host-2.
    [(pending, resumed)] = seen
    assert resumed and pending.pending
    assert (pending.node, pending.source, pending.move) == ("host-2", "host-1", job.id)
    settled = owner_of(store, uuid)
    assert settled.node == "host-2" and not settled.pending
    assert one.cvms.cluster_of(uuid) is None


def test_a_move_the_destination_cannot_resume_takes_the_owner_back(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    uuid = clustered_vm(lab, store, one)
    _destination_cannot_load(lab, lab.two.vms.source)  # type: ignore[arg-type]
    job = run_move(lab, storage=Storage.SHARED)
    assert job.state == Phase.FAILED
    owner = owner_of(store, uuid)
    assert owner.node == "host-1" and not owner.pending
    record = lab.one.vm("roamer")
    assert record is not None and record.state is VmState.RUNNING


def test_a_move_whose_owner_changed_underneath_is_undone(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    uuid = clustered_vm(lab, store, one)
    asyncio.run(store.put(one.m.keys.vm_owner(uuid), Owner.settled("host-3").encode()))
    job = run_move(lab, storage=Storage.SHARED)
    assert job.state == Phase.FAILED
    assert "the cluster says node host-3 owns the VM" in job.detail["error"]
    assert owner_of(store, uuid).node == "host-3"
    model = lab.two.vms.source
    assert model is not None
    assert_back_on_source(lab, job, model)


def test_the_refused_moves(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    clustered_vm(lab, store, one)
    with pytest.raises(InvalidInputError, match="its disks are not copied"):
        asyncio.run(one.cvms.check_move("roamer", "host-2", Storage.COPY))
    with pytest.raises(NoPlacementError, match="host-9 is not a node of the cluster"):
        asyncio.run(one.cvms.check_move("roamer", "host-9", Storage.AUTO))


# -- drain, resume, upgrade-level ---------------------------------------------------------


def test_drain_hands_off_vms_over_and_stops_at_one_it_cannot_place(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    small = role_on_volume(lab, "small", "small-uuid")
    big = role_on_volume(lab, "big", "big-uuid").model_copy(update={"memory": 3000 * M})
    for spec, priority in ((small, Priority.HIGH), (big, Priority.MEDIUM)):
        asyncio.run(put_role(store, spec, "host-1", Want.OFF, priority))
        lab.one.catalog.add_vm(spec)
        one.cvms.mark(spec.uuid, CLUSTER)

    async def drain() -> object:
        job = await one.maintenance.start_drain(CLUSTER, "host-1")
        assert job.task is not None
        await job.task
        return job

    job = asyncio.run(drain())
    assert job.state == "failed"  # type: ignore[attr-defined]
    assert job.detail["error"] == (  # type: ignore[attr-defined]
        "drain of host-1 stopped at VM 'big': cannot place VM 'big' (2.9G, configuration "
        "version 2): host-1 is where the VM is now; host-2 has 2G free; host-3 has 512M free"
    )
    assert owner_of(store, "small-uuid").node == "host-2"  # off: owner only
    assert lab.one.catalog.find("small") is None
    assert owner_of(store, "big-uuid").node == "host-1"
    member = MemberRecord.from_json(snapshot(store)[one.m.keys.member("host-1")])
    assert member.draining
    with pytest.raises(InvalidInputError, match="a drain runs on the node it drains"):
        asyncio.run(one.maintenance.start_drain(CLUSTER, "host-2"))
    asyncio.run(one.maintenance.resume(CLUSTER, "host-1"))
    assert not MemberRecord.from_json(snapshot(store)[one.m.keys.member("host-1")]).draining


def test_upgrade_level_refused_while_a_node_is_older(cluster: tuple) -> None:
    _, store, one, _ = cluster
    before = snapshot(store)
    with pytest.raises(VersionError) as caught:
        asyncio.run(one.maintenance.upgrade_level(CLUSTER))
    assert str(caught.value) == (
        "cannot raise cluster 'c1' to functional level 3: node host-1 (2) runs "
        "an older level; upgrade it first (drain, upgrade, resume)"
    )
    assert snapshot(store) == before
    for name in ("host-1",):
        key = one.m.keys.member(name)
        upgraded = MemberRecord(name, f"https://{name}", "1", 3, 0.0)
        asyncio.run(store.txn([Compare.unchanged(key, asyncio.run(store.get(key)).mod_revision)],  # type: ignore[union-attr]
                              [Put(key, upgraded.to_json())]))  # fmt: skip
    assert asyncio.run(one.maintenance.upgrade_level(CLUSTER)) == {
        "cluster": CLUSTER, "functional_level": 3, "was": 2}  # fmt: skip
    assert one.m.functional_level == 3
    with pytest.raises(StateError, match="already at functional level 3"):
        asyncio.run(one.maintenance.upgrade_level(CLUSTER))


def test_start_needs_ownership_and_sets_want(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    spec = role_on_volume(lab)
    asyncio.run(put_role(store, spec, "host-2", Want.OFF))
    lab.one.catalog.add_vm(spec)
    one.cvms.mark(spec.uuid, CLUSTER)
    with pytest.raises(StateError, match="it is owned by host-2 in cluster 'c1'"):
        asyncio.run(one.cvms.before_start("roamer"))
    asyncio.run(store.put(one.m.keys.vm_owner(spec.uuid), Owner.settled("host-1").encode()))
    asyncio.run(one.cvms.before_start("roamer"))
    assert snapshot(store)[one.m.keys.vm_want(spec.uuid)] == b"running"
    asyncio.run(one.cvms.before_stop("roamer"))
    assert snapshot(store)[one.m.keys.vm_want(spec.uuid)] == b"off"
    store.set_available(False)
    with pytest.raises(FerryError, match="memory://"):
        asyncio.run(one.cvms.before_start("roamer"))


def test_a_guest_that_powered_off_stays_off_a_crashed_one_restarts(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    spec = role_on_volume(lab)
    asyncio.run(put_role(store, spec, "host-1", Want.RUNNING))
    lab.one.catalog.add_vm(spec, VmState.RUNNING)  # as if its QEMU ran here
    one.cvms.mark(spec.uuid, CLUSTER)
    assert asyncio.run(one.reconciler.pass_once(one.m)) == []  # it runs: nothing to do
    lab.one.vms.apply(spec.uuid, VmOp.KILL)  # off, and nobody asked through ferry
    assert asyncio.run(one.reconciler.pass_once(one.m)) == []
    assert snapshot(store)[one.m.keys.vm_want(spec.uuid)] == b"off"
    events = [json.loads(v) for k, v in snapshot(store).items() if "/events/" in k]
    assert [(e["kind"], e["reason"]) for e in events] == [("vm-stopped", "its guest powered off")]
    # A crash is different: the reconciler starts it again.
    asyncio.run(store.put(one.m.keys.vm_want(spec.uuid), b"running"))
    lab.one.vms.apply(spec.uuid, VmOp.START)
    lab.one.vms.apply(spec.uuid, VmOp.CRASHED)
    started: list[str] = []

    async def start(name: str, *, paused: bool = False) -> object:
        started.append(name)
        return lab.one.catalog.get(name)

    lab.one.vms.start = start  # type: ignore[method-assign]
    assert asyncio.run(one.reconciler.pass_once(one.m)) == [(spec.uuid, Action.START)]
    assert started == ["roamer"]


def test_upgrade_version_on_the_owner_reaches_the_cluster_config(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    spec = role_on_volume(lab)
    asyncio.run(put_role(store, spec, "host-1", Want.OFF))
    lab.one.catalog.add_vm(spec.model_copy(update={"kernel": "/local/copy/kernel"}))
    one.cvms.mark(spec.uuid, CLUSTER)
    record = asyncio.run(lab.one.vms.upgrade_version("roamer"))
    asyncio.run(one.cvms.after_upgrade(record))
    role = VmRole.model_validate_json(snapshot(store)[one.m.keys.vm_config(spec.uuid)])
    assert role.spec.config_version == record.spec.config_version == 3
    assert role.spec.kernel is None  # only the version travels, not this node's paths


def test_deleting_an_added_vm_removes_its_files_only(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    shared = lab.root / "shared"
    (shared / "flat.qcow2").write_bytes(b"qcow2")  # a disk at the volume's top
    (shared / "someone-elses.qcow2").write_bytes(b"keep me")
    kernel = lab.root / "vmlinuz"
    kernel.write_bytes(b"K")
    spec = VmSpec(uuid="flat-uuid", name="flat", config_version=2, memory=128 * M,
                  kernel=str(kernel),
                  disks=(DiskSpec(path=str(shared / "flat.qcow2"), size=M),))  # fmt: skip
    lab.one.catalog.add_vm(spec)
    asyncio.run(one.cvms.add(CLUSTER, "flat", priority=Priority.LOW))
    assert (shared / "flat-uuid" / "kernel").read_bytes() == b"K"
    assert asyncio.run(one.cvms.delete("flat", force=False))
    assert sorted(p.name for p in shared.iterdir()) == ["someone-elses.qcow2"]
    assert not [k for k in snapshot(store) if "flat" in k]


def test_drain_moves_a_running_vm_live_and_its_owner_follows(cluster: tuple) -> None:
    lab, store, one, _ = cluster
    uuid = clustered_vm(lab, store, one)

    async def drain() -> object:
        job = await one.maintenance.start_drain(CLUSTER, "host-1")
        assert job.task is not None
        await job.task
        return job

    job = asyncio.run(drain())
    assert job.state == "done", job.detail  # type: ignore[attr-defined]
    assert job.detail["result"]["moved"] == [  # type: ignore[attr-defined]
        {"vm": "roamer", "to": "host-2", "live": True}]  # fmt: skip
    assert job.detail["progress"] == {"vms_done": 1, "vms_total": 1}  # type: ignore[attr-defined]
    assert owner_of(store, uuid).node == "host-2" and not owner_of(store, uuid).pending
    arrived = lab.two.vm("roamer")
    assert arrived is not None and arrived.state is VmState.RUNNING
    assert lab.one.vm("roamer") is None
    kinds = [json.loads(v)["kind"] for k, v in snapshot(store).items() if "/events/" in k]
    assert kinds == ["node-draining", "vm-drained", "node-drained"]


def test_want_off_asked_on_another_node_stops_it_on_its_owner(cluster: tuple) -> None:
    """Show and stop from a node that does not own the VM: the store's view, and the
    owner's reconciler stops it (once, cleanly) only for an "off" that came after it ran."""
    lab, store, one, two = cluster
    spec = role_on_volume(lab)
    asyncio.run(put_role(store, spec, "host-1", Want.RUNNING))
    lab.one.catalog.add_vm(spec, VmState.RUNNING)  # as if its QEMU ran here
    one.cvms.mark(spec.uuid, CLUSTER)
    stopped: list[str] = []

    async def stop(name: str, *, timeout: float | None = None) -> tuple[object, bool]:
        stopped.append(name)
        lab.one.vms.apply(spec.uuid, VmOp.KILL)  # off
        return lab.one.catalog.get(name), False

    lab.one.vms.stop = stop  # type: ignore[method-assign]
    keys = one.m.keys

    async def stopping_done() -> None:
        for _ in range(200):
            if not one.reconciler._stopping:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the reconciler's stop never ended")

    async def go() -> None:
        assert await one.reconciler.pass_once(one.m) == []  # it runs, wanted running
        remote = await two.cvms.remote("roamer")
        assert remote is not None and remote.owner is not None and remote.owner.node == "host-1"
        assert (remote.state, remote.want, remote.cluster) == ("running", Want.RUNNING, CLUSTER)
        assert await two.cvms.remote(spec.uuid) == remote  # by uuid too
        assert await two.cvms.remote("nope") is None
        await two.cvms.want_remote(remote, Want.OFF)
        assert (await store.get(keys.vm_want(spec.uuid))).value == b"off"  # type: ignore[union-attr]
        assert await one.reconciler.pass_once(one.m) == [(spec.uuid, Action.STOP)]
        await stopping_done()
        assert stopped == ["roamer"]
        assert await one.reconciler.pass_once(one.m) == []  # off and wanted off
        assert (await two.cvms.remote("roamer")).state == "off"  # type: ignore[union-attr]
        # Started here on purpose while want stays off: not the reconciler's to stop...
        lab.one.vms.apply(spec.uuid, VmOp.START)
        lab.one.vms.apply(spec.uuid, VmOp.STARTED)
        assert await one.reconciler.pass_once(one.m) == []
        assert await one.reconciler.pass_once(one.m) == []
        # ... until "off" is asked again.
        await store.put(keys.vm_want(spec.uuid), Want.OFF.value.encode())
        assert await one.reconciler.pass_once(one.m) == [(spec.uuid, Action.STOP)]
        await stopping_done()
        assert stopped == ["roamer", "roamer"]
        # The owner down: nobody can tell its state.
        await store.delete(keys.alive("host-1"))
        assert (await two.cvms.remote("roamer")).state == "unknown"  # type: ignore[union-attr]

    asyncio.run(go())
    events = [json.loads(v) for k, v in snapshot(store).items() if "/events/" in k]
    assert [(e["kind"], e["reason"]) for e in events] == [
        ("vm-stopped", "wanted off: shut down cleanly")] * 2  # fmt: skip
