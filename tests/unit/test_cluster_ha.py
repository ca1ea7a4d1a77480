"""HA decisions (pure) and the leader's pass over the in-memory store.

The leader moves a lost node's VMs (want=running) only once etcd expired the
node's lease, high priority first, onto the up node with the most free
memory, by compare-and-swap; a node that comes back first, a pending move
with a live end, or a VM that should be off stays where it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from ferry.core.cluster.ha import plan
from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.roles import Owner, Priority, VmRole, encode_role
from ferry.core.cluster.store import Put
from ferry.core.spec import VmSpec
from ferry.testing.cluster import GIB, MemoryCluster

KEYS = ClusterKeys("c1")


def run(body: Callable[[MemoryCluster], Awaitable[None]], tmp_path: Path) -> None:
    async def main() -> None:
        lab = MemoryCluster(tmp_path)
        try:
            await lab.node("host-1", memory_free=8 * GIB).create("c1", [lab.url], None)
            await lab.node("host-2", memory_free=4 * GIB).join("c1", [lab.url], None)
            await lab.node("host-3", memory_free=6 * GIB).join("c1", [lab.url], None)
            await body(lab)
        finally:
            for service in lab.services.values():
                await service.shutdown()

    asyncio.run(main())


async def add_vm(lab: MemoryCluster, name: str, owner: str, *, memory: int = GIB,
                 priority: Priority = Priority.MEDIUM, want: str = "running",
                 config_version: int = 3, pending_from: str | None = None) -> str:  # fmt: skip
    spec = VmSpec(name=name, config_version=config_version, memory=memory)
    role = VmRole(spec=spec, priority=priority, volume="csv1")
    if pending_from is None:
        who = Owner.settled(owner)
    else:
        who = Owner.moving(owner, source=pending_from, move="job-1")
    await lab.store.txn([], [Put(KEYS.vm_config(spec.uuid), encode_role(role)),
                             Put(KEYS.vm_owner(spec.uuid), who.encode()),
                             Put(KEYS.vm_want(spec.uuid), want.encode()),
                             Put(KEYS.name(name), spec.uuid.encode())])  # fmt: skip
    return spec.uuid


async def owners(lab: MemoryCluster) -> dict[str, str]:
    entries = await lab.store.range(KEYS.prefix)
    names = {e.value.decode(): ClusterKeys.last_part(e.key)
             for e in entries if e.key.startswith(KEYS.names)}  # fmt: skip
    return {names[ClusterKeys.vm_uuid_of(e.key)]: Owner.decode(e.value).node
            for e in entries if e.key.endswith("/owner")}  # fmt: skip


def test_plan_restarts_high_priority_first_by_free_memory_and_skips_what_must_stay(
    tmp_path: Path,
) -> None:
    async def body(lab: MemoryCluster) -> None:
        await add_vm(lab, "low", "host-2", memory=5 * GIB, priority=Priority.LOW)
        await add_vm(lab, "high", "host-2", memory=5 * GIB, priority=Priority.HIGH)
        await add_vm(lab, "medium", "host-2", memory=5 * GIB)
        await add_vm(lab, "off", "host-2", want="off")
        await add_vm(lab, "moving-in", "host-2", pending_from="host-3")  # its source lives
        await add_vm(lab, "both-lost", "host-2", pending_from="host-2")
        await add_vm(lab, "safe", "host-3")
        assert plan(await lab.store.range(KEYS.prefix), KEYS).restarts == ()
        await lab.expire("host-2")
        decided = plan(await lab.store.range(KEYS.prefix), KEYS)
        assert decided.lost == ("host-2",)
        moves = [(r.vm, r.source, r.target) for r in decided.restarts]
        # 8 GiB and 6 GiB free: high takes host-1 (3 left); then by name among the
        # medium ones, both-lost (1 GiB) host-3 (5 left), medium host-3 (0 left); low
        # fits nowhere.
        assert moves == [("high", "host-2", "host-1"), ("both-lost", "host-2", "host-3"),
                         ("medium", "host-2", "host-3")]  # fmt: skip
        assert [(r.vm, r.source) for r in decided.refused] == [("low", "host-2")]
        assert "host-1 has 3G free" in decided.refused[0].reason
        assert "host-2 is down" in decided.refused[0].reason
        assert "node host-2 lost its lease" in decided.restarts[0].reason

    run(body, tmp_path)


def test_the_leader_moves_owners_by_compare_and_swap_and_records_why(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        await add_vm(lab, "web", "host-2", priority=Priority.HIGH)
        await add_vm(lab, "db", "host-2", memory=7 * GIB)
        await add_vm(lab, "huge", "host-2", memory=64 * GIB)
        assert await lab.lead("host-1")
        assert await owners(lab) == {"web": "host-2", "db": "host-2", "huge": "host-2"}
        await lab.expire("host-2")
        await lab.lead("host-1")
        # web (high) first takes host-1 (8 GiB free, 7 left), then db (7 GiB) fits there too.
        assert await owners(lab) == {"web": "host-1", "db": "host-1", "huge": "host-2"}
        # Nothing more happens on later passes, and the refusal is recorded once.
        await lab.lead("host-1")
        await lab.lead("host-1")
        events = [(e.kind, e.vm, e.node) for e in await lab.membership("host-1").events()
                  if e.kind.startswith(("vm-", "node-down"))]  # fmt: skip
        assert events == [("node-down", None, "host-2"), ("vm-restart", "web", "host-1"),
                          ("vm-restart", "db", "host-1"),
                          ("vm-restart-refused", "huge", "host-2")]  # fmt: skip

    run(body, tmp_path)


def test_a_node_back_before_the_swap_keeps_its_vms(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        await add_vm(lab, "web", "host-2")
        assert await lab.lead("host-1")
        stale = await lab.store.range(KEYS.prefix)
        await lab.expire("host-2")
        decided = plan(await lab.store.range(KEYS.prefix), KEYS)
        assert [r.vm for r in decided.restarts] == ["web"]
        # host-2 regrants and puts alive again before the leader's swap lands.
        await lab.membership("host-2").on_lease_lost()
        leader = lab.services["host-1"].loops
        assert leader is not None and leader.leader_work is not None
        from ferry.host.cluster.ha import HaLeader

        ha = leader.leader_work
        assert isinstance(ha, HaLeader)
        assert not await ha._move(decided.restarts[0])
        assert await owners(lab) == {"web": "host-2"}
        assert plan(stale, KEYS).restarts == ()

    run(body, tmp_path)


def test_only_the_leader_moves_owners(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        await add_vm(lab, "web", "host-2")
        assert await lab.lead("host-3")
        await lab.expire("host-2")
        # host-1 has the HA code too, but no leader key: its swap must fail.
        decided = plan(await lab.store.range(KEYS.prefix), KEYS)
        loops = lab.services["host-1"].loops
        assert loops is not None and not await lab.lead("host-1")
        from ferry.host.cluster.ha import HaLeader

        ha = loops.leader_work
        assert isinstance(ha, HaLeader)
        assert not await ha._move(decided.restarts[0])
        assert await owners(lab) == {"web": "host-2"}
        await lab.lead("host-3")
        assert await owners(lab) == {"web": "host-1"}

    run(body, tmp_path)


def test_a_vm_above_every_nodes_level_is_refused_with_the_reason(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        await lab.services["host-3"].shutdown()
        await lab.expire("host-3")
        await add_vm(lab, "new", "host-3", config_version=3)
        for name in ("host-1", "host-2"):
            m = lab.membership(name)
            await m.put_member(replace(m.member, functional_level=2))
        decided = plan(await lab.store.range(KEYS.prefix), KEYS)
        assert decided.restarts == ()
        assert "host-1 runs functional level 2; host-2 runs functional level 2" in (
            decided.refused[0].reason
        )

    run(body, tmp_path)


def test_running_loops_react_to_a_lost_node_and_leader_before_the_next_poll(
    tmp_path: Path,
) -> None:
    """With the node loops running: deletes of alive records and of the leader key wake them."""

    async def wait_for(check: Callable[[], Awaitable[bool]], limit: float) -> float:
        start = asyncio.get_running_loop().time()
        while not await check():
            assert asyncio.get_running_loop().time() - start < limit, "not in time"
            await asyncio.sleep(0.01)
        return asyncio.get_running_loop().time() - start

    async def body(lab: MemoryCluster) -> None:
        poll = lab.timings.leader_poll_s  # 1 s with the 4 s TTL
        for service in lab.services.values():
            assert service.loops is not None
            service.loops.start()

        async def leader() -> str | None:
            entry = await lab.store.get(KEYS.leader)
            return entry.value.decode() if entry else None

        async def led() -> bool:
            return await leader() is not None

        await wait_for(led, 2 * poll)
        first = await leader()
        victim = next(n for n in ("host-1", "host-2", "host-3") if n != first)
        await add_vm(lab, "web", victim)
        loops = lab.services[victim].loops
        assert loops is not None
        await loops.stop()  # the node is gone: nothing renews its lease any more
        await asyncio.sleep(0.05)
        await lab.expire(victim)

        async def moved() -> bool:
            return (await owners(lab))["web"] != victim

        assert await wait_for(moved, poll / 2) < poll / 2
        assert first is not None
        loops = lab.services[first].loops
        assert loops is not None
        await loops.stop()
        await asyncio.sleep(0.05)
        await lab.expire(first)

        async def new_leader() -> bool:
            return await leader() not in (None, first)

        assert await wait_for(new_leader, poll / 2) < poll / 2

    run(body, tmp_path)


def test_the_leader_gives_a_lost_nodes_replica_vms_to_an_up_node(tmp_path: Path) -> None:
    """The replica broker's replica VMs (replicas/<uuid>/owner) follow the lost node's
    VMs: by compare-and-swap, to the up node with the most free memory, with an event."""

    async def body(lab: MemoryCluster) -> None:
        await lab.store.put(KEYS.replica_owner("r-1"), Owner.settled("host-2").encode())
        await lab.store.put(KEYS.replica_owner("r-2"), Owner.settled("host-3").encode())
        assert await lab.lead("host-1")
        await lab.expire("host-2")
        await lab.lead("host-1")
        held = {ClusterKeys.replica_uuid_of(e.key): Owner.decode(e.value).node
                for e in await lab.store.range(KEYS.replicas)}  # fmt: skip
        assert held == {"r-1": "host-1", "r-2": "host-3"}  # host-1: 8 GiB free, host-3: 6
        events = [(e.kind, e.vm, e.node) for e in await lab.membership("host-1").events()
                  if e.kind == "replica-reowned"]  # fmt: skip
        assert events == [("replica-reowned", "r-1", "host-1")]

    run(body, tmp_path)
