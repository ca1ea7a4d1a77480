"""The hand-over of a move between clusters (ferry.host.cluster.crossing) on a MemoryStore.

At every revision exactly one cluster owns the VM: one transaction deletes its
role in c1 and puts it in c2; a destination that cannot resume gives it back
by the reverse transaction; a changed owner refuses the hand-over, changing
nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.nodes import MemberRecord
from ferry.core.cluster.records import ClusterMeta
from ferry.core.cluster.roles import Owner, VmRole, encode_role
from ferry.core.cluster.timing import ClusterTimings
from ferry.core.migration import Storage
from ferry.core.spec import DiskSpec, VmSpec
from ferry.errors import MoveFailedError
from ferry.host.cluster.crossing import ClusterCrossing, Crossing, CrossingGuard
from ferry.host.cluster.membership import Membership
from ferry.testing.store import MemoryStore

UUID = "0b4e2c1a-0000-4000-8000-000000000001"
K1, K2 = ClusterKeys("c1"), ClusterKeys("c2")
SPEC = VmSpec(name="web", uuid=UUID, config_version=3, memory=128 * 2**20,
              disks=(DiskSpec(path=f"/c1/csv1/{UUID}/disk0.qcow2", size=2**25),))  # fmt: skip


class FakeVms:
    """What the guard asks of ClusterVms: this node, its membership, the owner, marks."""

    def __init__(self, m: Membership) -> None:
        self.m, self.node, self.marks = m, "host-1", [UUID]

    def membership(self, cluster: str | None = None) -> Membership:
        return self.m

    async def owner_entry(self, m: Membership, uuid: str) -> tuple[Any, Any]:
        entry = await m.store.get(m.keys.vm_owner(uuid))
        return (Owner.decode(entry.value) if entry else None), entry

    def mark(self, uuid: str, cluster: str | None) -> None:
        if cluster is None and uuid in self.marks:
            self.marks.remove(uuid)


class FakeJobs:
    def __init__(self) -> None:
        self.detail: dict[str, Any] = {}

    def find(self, job_id: str) -> str:
        return job_id

    def update(self, job: str, **detail: Any) -> None:
        self.detail.update(detail)


class Inner:
    async def before_switch(self, vm_uuid: str, target: str, job: str) -> None:
        raise AssertionError("a crossing never asks the in-cluster hand-over")

    async def after_switch(self, vm_uuid: str, target: str, job: str, *, resumed: bool) -> bool:
        raise AssertionError("a crossing never asks the in-cluster hand-over")


def setup() -> tuple[MemoryStore, CrossingGuard, FakeJobs, FakeVms]:
    store = MemoryStore()
    m = Membership(store, cluster="c1", node="host-1", lease=0,
                   timings=ClusterTimings.from_ttl(10),
                   member=MemberRecord("host-1", "", "0", 3, 0.0),
                   meta=ClusterMeta("c1", 0.0, 3))  # fmt: skip
    role = VmRole(spec=SPEC, volume="csv1")

    async def seed() -> None:
        await store.put(K1.vm_config(UUID), encode_role(role))
        await store.put(K1.vm_owner(UUID), Owner.settled("host-1").encode())
        await store.put(K1.vm_want(UUID), b"running")
        await store.put(K1.name("web"), UUID.encode())

    asyncio.run(seed())
    fake, jobs = FakeVms(m), FakeJobs()
    crossing = ClusterCrossing(fake, jobs)  # type: ignore[arg-type]
    moved = SPEC.model_copy(update={"disks": (DiskSpec(path=f"/c2/csv1/{UUID}/disk0.qcow2",
                                                       size=2**25),)})  # fmt: skip
    crossing.plans["job1"] = Crossing(vm="web", uuid=UUID, source="c1", target="c2",
                                      node="host-3", url="https://host-3", volume="csv1",
                                      storage=Storage.COPY,
                                      role=VmRole(spec=moved, volume="csv1"))  # fmt: skip
    return store, CrossingGuard(crossing, Inner()), jobs, fake  # type: ignore[arg-type]


def keys(store: MemoryStore) -> dict[str, Any]:
    return {e.key: e for e in asyncio.run(store.range("/ferry/clusters/"))
            if "/events/" not in e.key}  # fmt: skip


def test_one_revision_releases_c1_and_gives_c2_the_vm() -> None:
    store, guard, jobs, fake = setup()
    asyncio.run(guard.before_switch(UUID, "host-3", "job1"))
    now = keys(store)
    assert not [k for k in now if k.startswith(K1.prefix)], now
    owner = now[K2.vm_owner(UUID)]
    assert Owner.decode(owner.value).node == "host-3" and not Owner.decode(owner.value).pending
    revisions = {now[k].mod_revision for k in (K2.vm_config(UUID), K2.vm_owner(UUID),
                                               K2.vm_want(UUID), K2.name("web"))}  # fmt: skip
    assert len(revisions) == 1  # written with c1's deletes, in one transaction
    # ... and into the move's job at once, for a restart of this agent.
    assert jobs.detail["handover_revision"] in revisions and jobs.detail["durable"], jobs.detail
    role = VmRole.model_validate_json(now[K2.vm_config(UUID)].value)
    assert role.spec.disks[0].path.startswith("/c2/csv1/")
    assert asyncio.run(guard.after_switch(UUID, "host-3", "job1", resumed=True))
    assert jobs.detail["result_extra"]["unprotected_s"] == 0.0
    assert jobs.detail["result_extra"]["handover_revision"] == revisions.pop()
    assert fake.marks == []
    kinds = [e.key for e in asyncio.run(store.range(K1.events))]
    assert kinds and asyncio.run(store.range(K2.events))


def test_a_destination_that_cannot_resume_gives_it_back_to_c1() -> None:
    store, guard, _, _ = setup()
    before = {k: e.value for k, e in keys(store).items()}
    asyncio.run(guard.before_switch(UUID, "host-3", "job1"))
    assert asyncio.run(guard.after_switch(UUID, "host-3", "job1", resumed=False))
    after = {k: e.value for k, e in keys(store).items()}
    assert set(after) == set(before)
    assert Owner.decode(after[K1.vm_owner(UUID)]).node == "host-1"
    assert after[K1.vm_config(UUID)] == before[K1.vm_config(UUID)]


def test_an_owner_that_changed_refuses_the_hand_over() -> None:
    store, guard, _, _ = setup()
    asyncio.run(store.put(K1.vm_owner(UUID), Owner.settled("host-2").encode()))
    before = {k: e.value for k, e in keys(store).items()}
    with pytest.raises(MoveFailedError, match="says node host-2 owns the VM"):
        asyncio.run(guard.before_switch(UUID, "host-3", "job1"))
    assert {k: e.value for k, e in keys(store).items()} == before


def test_a_name_taken_in_c2_meanwhile_refuses_it() -> None:
    store, guard, _, _ = setup()
    asyncio.run(store.put(K2.name("web"), b"someone-else"))
    before = {k: e.value for k, e in keys(store).items()}
    with pytest.raises(MoveFailedError, match="changed in cluster c1 or c2"):
        asyncio.run(guard.before_switch(UUID, "host-3", "job1"))
    assert {k: e.value for k, e in keys(store).items()} == before
