"""The lease keeper over the in-memory store and a fake clock: when it renews, when it
fences, and how it rejoins.

TTL 4 s throughout: renew every 1 s, self-fence at 3.2 s after the send time of
the last successful renewal, guard beaten after each success.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from ferry.core.cluster.nodes import MemberRecord
from ferry.core.cluster.records import ClusterMeta
from ferry.core.cluster.timing import ClusterTimings
from ferry.core.tasks import cancel_and_wait
from ferry.errors import FenceGuardError, QemuError
from ferry.host.cluster.fencing import FENCED_EVENT, LeaseKeeper, NodeFencing
from ferry.host.cluster.membership import Membership
from ferry.testing.clock import FakeClock
from ferry.testing.store import MemoryStore

TIMINGS = ClusterTimings.from_ttl(4)
NODE = "host-1"


@dataclass
class FakeGuard:
    beats: list[float] = field(default_factory=list)
    synced: list[dict[str, int]] = field(default_factory=list)
    broken: bool = False
    clock: FakeClock | None = None

    async def beat(self) -> None:
        if self.broken:
            raise FenceGuardError("the fence guard on /run/x.sock closed the connection")
        assert self.clock is not None
        self.beats.append(self.clock.time())

    async def sync(self, wanted: dict[str, int]) -> None:
        if self.broken:
            raise FenceGuardError("the fence guard on /run/x.sock closed the connection")
        self.synced.append(dict(wanted))


class HangingStore(MemoryStore):
    """A store whose keepalives wait while it hangs (etcd overloaded), then go through."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.answering = asyncio.Event()
        self.answering.set()

    async def keepalive(self, lease: int) -> int:
        await self.answering.wait()
        return await super().keepalive(lease)


@dataclass
class World:
    clock: FakeClock
    store: HangingStore
    membership: Membership
    keeper: LeaseKeeper
    guard: FakeGuard
    fences: list[tuple[float, str, bool]]  # (time, reason, lease still held by etcd)
    running: dict[str, int]
    stuck: list[bool]

    async def step(self, seconds: float, every: float = 1 / 16) -> None:
        """Let ``seconds`` of fake time pass in small steps, every task running between."""
        end = self.clock.time() + seconds
        while self.clock.time() < end - 1e-9:
            self.clock.advance(min(every, end - self.clock.time()))
            await self.clock.settle()

    async def alive_lease(self) -> int | None:
        self.store.available, was = True, self.store.available
        try:
            entry = await self.store.get(self.membership.keys.alive(NODE))
        finally:
            self.store.available = was
        return entry.lease if entry else None


@contextlib.asynccontextmanager
async def world() -> AsyncIterator[World]:
    clock = FakeClock()
    store = HangingStore(clock)
    lease = await store.grant(TIMINGS.ttl_s)
    member = MemberRecord(name=NODE, url="https://host-1.test:8443", version="0.1.0",
                          functional_level=3, joined=clock.time())  # fmt: skip
    meta = ClusterMeta(name="c1", created=clock.time(), functional_level=3)
    membership = Membership(store, cluster="c1", node=NODE, lease=lease, timings=TIMINGS,
                            member=member, meta=meta, clock=clock.time)  # fmt: skip
    await membership.put_alive()
    guard = FakeGuard(clock=clock)
    running = {"11111111-1111-1111-1111-111111111111": 4242}
    fences: list[tuple[float, str, bool]] = []
    stuck: list[bool] = []  # one entry per kill that fails

    async def fence(reason: str) -> list[str]:
        fences.append((clock.time(), reason, membership.lease in store._leases))
        if stuck:
            stuck.pop()
            raise QemuError(f"fencing ({reason}): pid 4242 of VM u: did not die")
        killed, running_now = list(running), dict(running)
        running.clear()
        return killed if running_now else []

    keeper = LeaseKeeper(membership, fence=fence, guard=guard, protected=lambda: dict(running),
                         clock=clock)  # fmt: skip
    task = asyncio.create_task(keeper.run())
    await clock.settle()
    try:
        yield World(clock, store, membership, keeper, guard, fences, running, stuck)
    finally:
        await cancel_and_wait(task)
        if store._reaper is not None:
            await cancel_and_wait(store._reaper)


def run(body: Callable[[World], Awaitable[None]]) -> None:
    async def main() -> None:
        async with world() as w:
            await body(w)

    asyncio.run(main())


def test_a_healthy_node_renews_every_quarter_ttl_and_beats_the_guard() -> None:
    async def body(w: World) -> None:
        lease = w.membership.lease
        await w.step(5 * TIMINGS.ttl_s)
        assert w.fences == []
        assert await w.alive_lease() == lease, "the lease expired while renewed"
        # One beat per successful renewal, TTL/4 apart (the first at start).
        gaps = [b - a for a, b in zip(w.guard.beats, w.guard.beats[1:], strict=False)]
        assert len(w.guard.beats) == 21
        assert all(abs(g - TIMINGS.renew_interval_s) < 0.06 for g in gaps), gaps
        assert w.guard.synced[-1] == {"11111111-1111-1111-1111-111111111111": 4242}
        assert w.keeper.holds_lease()

    run(body)


def test_a_node_cut_from_etcd_fences_at_its_deadline_before_the_lease_expires() -> None:
    async def body(w: World) -> None:
        old = w.membership.lease
        await w.step(2.0)  # renewals at 0, 1, 2 (the last one sent at 2.0)
        last_sent = w.clock.time()
        beats = len(w.guard.beats)
        w.store.available = False
        await w.step(TIMINGS.self_fence_s - 0.1)
        assert w.fences == [], "fenced before the deadline"
        assert w.keeper.holds_lease()
        await w.step(0.15)
        assert len(w.fences) == 1
        at, reason, held = w.fences[0]
        assert at == pytest.approx(last_sent + TIMINGS.self_fence_s, abs=0.07)
        assert held, "fenced only after etcd had let the lease go"
        assert at < last_sent + TIMINGS.ttl_s
        assert reason.startswith("no lease renewal for 3.2s")
        assert not w.keeper.holds_lease()
        assert len(w.guard.beats) == beats, "the guard was beaten without a renewal"
        # etcd expires the lease on its own clock; the node is still cut off.
        await w.step(2.0)
        assert old not in w.store._leases and await w.alive_lease() is None
        w.store.available = True
        await w.step(1.1 + 2 * TIMINGS.leader_poll_s)
        assert len(w.fences) == 1, "fenced twice"
        new = w.membership.lease
        assert new != old and await w.alive_lease() == new
        fenced = await w.store.get(w.membership.keys.fenced(NODE))
        assert fenced is not None
        record = json.loads(fenced.value)
        assert record["reason"] == reason
        assert record["killed"] == ["11111111-1111-1111-1111-111111111111"]
        assert record["at"] > at
        events = [(e.kind, e.node, e.reason) for e in await w.membership.events()]
        assert (FENCED_EVENT, NODE, reason) in events
        assert w.keeper.holds_lease() and len(w.guard.beats) == beats + 1

    run(body)


def test_a_renewal_that_hangs_is_cut_off_at_the_deadline_and_the_old_lease_retired() -> None:
    async def body(w: World) -> None:
        old = w.membership.lease
        await w.step(1.0)
        last_sent = w.clock.time()
        w.store.answering.clear()
        await w.step(TIMINGS.self_fence_s + 0.1)
        assert len(w.fences) == 1
        assert w.fences[0][0] == pytest.approx(last_sent + TIMINGS.self_fence_s, abs=0.07)
        # etcd answers again before it expired the lease: the keepalive would
        # succeed, but the node killed its QEMUs; it rejoins with a new lease
        # all the same and the old one (with any leader key on it) goes.
        assert old in w.store._leases
        w.store.answering.set()
        await w.step(0.1)
        assert old not in w.store._leases, "the old lease lingers"
        # No alive record for two leader polls: the leader sees the node lost.
        await w.step(2 * TIMINGS.leader_poll_s - 0.2)
        assert await w.alive_lease() is None
        await w.step(0.2)
        assert w.membership.lease != old
        assert await w.alive_lease() == w.membership.lease
        assert await w.store.get(w.membership.keys.fenced(NODE)) is not None
        assert len(w.fences) == 1

    run(body)


def test_etcd_saying_the_lease_is_gone_fences_at_once() -> None:
    async def body(w: World) -> None:
        old = w.membership.lease
        await w.step(0.5)
        w.store.expire(old)  # an admin revoked it, or etcd's clock ran ahead
        await w.step(0.6 + 2 * TIMINGS.leader_poll_s)
        assert len(w.fences) == 1
        assert w.fences[0][1] == f"etcd says lease {old:x} is gone"
        assert w.membership.lease != old and await w.alive_lease() == w.membership.lease

    run(body)


def test_a_stalled_event_loop_is_measured_and_fenced_for() -> None:
    async def body(w: World) -> None:
        await w.step(1.0)
        # Nothing runs for 3.5 s (a blocking call in the agent): then it wakes.
        w.clock.advance(3.5)
        await w.clock.settle()
        assert w.keeper.max_lag_s == pytest.approx(3.5 - TIMINGS.renew_interval_s, abs=0.07)
        # The deadline passed unseen: the keeper fences before anything else.
        assert len(w.fences) == 1
        assert w.fences[0][1].startswith("no lease renewal for 3.5s")

    run(body)


def test_a_guard_that_fails_does_not_stop_the_renewals() -> None:
    async def body(w: World) -> None:
        beats = len(w.guard.beats)
        w.guard.broken = True
        lease = w.membership.lease
        await w.step(3 * TIMINGS.ttl_s)
        assert w.fences == []
        assert await w.alive_lease() == lease
        w.guard.broken = False
        await w.step(1.0)
        assert len(w.guard.beats) == beats + 1

    run(body)


def test_a_short_outage_is_bridged_by_retries_without_fencing() -> None:
    async def body(w: World) -> None:
        lease = w.membership.lease
        await w.step(1.0)  # renewed at 0 and 1
        w.store.available = False
        await w.step(2.0)  # attempts at 2, 2.25, 2.5, ... all fail
        beats = len(w.guard.beats)
        back = w.clock.time()
        w.store.available = True
        await w.step(TIMINGS.retry_interval_s)
        # Renewed within one retry interval of etcd's return, not a renewal interval.
        assert len(w.guard.beats) == beats + 1
        assert w.guard.beats[-1] - back <= TIMINGS.retry_interval_s + 1e-6
        assert w.fences == [] and w.membership.lease == lease

    run(body)


@dataclass
class FakeGuardClient(FakeGuard):
    """What NodeFencing needs of FenceGuardClient."""

    calls: list[str] = field(default_factory=list)

    async def ensure_running(self) -> int:
        self.calls.append("ensure")
        return 99

    async def protect(self, uuid: str, pid: int) -> None:
        self.calls.append(f"protect {uuid} {pid}")

    async def disarm(self) -> None:
        self.calls.append("disarm")

    async def close(self) -> None:
        self.calls.append("close")


def test_node_fencing_runs_a_keeper_per_membership_and_disarms_on_leave() -> None:
    async def main() -> None:
        async with world() as w:
            guard = FakeGuardClient(clock=w.clock)
            fencing = NodeFencing(guard, clock=w.clock)  # type: ignore[arg-type]
            fencing.protected = lambda: {"u1": 7}
            assert not fencing.holds_lease()
            task = asyncio.create_task(fencing.keep(w.membership))
            await w.clock.settle()
            await w.step(2.0)
            assert fencing.holds_lease()
            assert guard.calls[0] == "ensure" and len(guard.beats) == 3
            assert guard.synced[-1] == {"u1": 7}
            await fencing.protect_now("u2", 8)
            await fencing.on_membership(None)
            assert guard.calls[-2:] == ["protect u2 8", "disarm"]
            await cancel_and_wait(task)
            assert fencing.keeper is None and not fencing.holds_lease()
            await fencing.close()
            assert guard.calls[-1] == "close"

    asyncio.run(main())


def test_no_rejoin_while_a_fenced_qemu_may_still_run() -> None:
    async def body(w: World) -> None:
        old = w.membership.lease
        w.stuck.extend([True, True])  # the first two kills fail (a QEMU stuck in the kernel)
        w.store.available = False
        await w.step(TIMINGS.self_fence_s + 0.1)
        assert len(w.fences) == 1
        w.store.available = True
        await w.step(1.1)
        # etcd answers, but the node must not rejoin yet: it kills again first,
        # and that fails too.
        assert len(w.fences) == 2
        assert w.membership.lease == old
        assert await w.store.get(w.membership.keys.fenced(NODE)) is None
        await w.step(1.1 + 2 * TIMINGS.leader_poll_s)
        assert len(w.fences) == 3 and w.stuck == []
        assert w.membership.lease != old and await w.alive_lease() == w.membership.lease
        assert await w.store.get(w.membership.keys.fenced(NODE)) is not None

    run(body)
