"""The cycle scheduler, driven by a fake clock: when cycles run, and what stops them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ferry.host.replication.scheduler import CycleScheduler
from ferry.testing.clock import FakeClock

FREQUENCY = 300.0


class Plan:
    """Relationships due every FREQUENCY seconds since their last cycle, as the services do."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.last: dict[str, float] = {}
        self.gone: set[str] = set()
        self.runs: list[tuple[str, float]] = []
        self.body: Callable[[str], Awaitable[None]] | None = None

    def delay(self, key: str) -> float | None:
        if key in self.gone:
            return None
        last = self.last.setdefault(key, self.clock.time())
        return max(0.0, last + FREQUENCY - self.clock.time())

    async def cycle(self, key: str) -> dict[str, Any]:
        self.last[key] = self.clock.time()
        self.runs.append((key, self.clock.time()))
        if self.body is not None:
            await self.body(key)
        return {"result": "ok", "run": len(self.runs)}


def run(test: Callable[[FakeClock, Plan, CycleScheduler], Awaitable[None]], **kwargs: Any) -> None:
    async def main() -> None:
        clock = FakeClock()
        plan = Plan(clock)
        scheduler = CycleScheduler("test", delay=plan.delay, cycle=plan.cycle, clock=clock,
                                   **kwargs)  # fmt: skip
        try:
            await test(clock, plan, scheduler)
        finally:
            await scheduler.shutdown()

    asyncio.run(main())


def test_a_cycle_runs_when_it_is_due_and_not_before() -> None:
    async def test(clock: FakeClock, plan: Plan, scheduler: CycleScheduler) -> None:
        start = clock.time()
        scheduler.spawn("vm")
        await clock.settle()
        clock.advance(FREQUENCY - 1)
        await clock.settle()
        assert plan.runs == []
        clock.advance(1)
        await clock.settle()
        assert plan.runs == [("vm", start + FREQUENCY)]
        clock.advance(FREQUENCY)
        await clock.settle()
        assert [t for _, t in plan.runs] == [start + FREQUENCY, start + 2 * FREQUENCY]
        scheduler.spawn("vm")  # spawning a running key changes nothing
        await clock.settle()
        assert len(plan.runs) == 2

    run(test)


def test_run_now_runs_at_once_and_returns_the_outcome() -> None:
    async def test(clock: FakeClock, plan: Plan, scheduler: CycleScheduler) -> None:
        scheduler.spawn("vm")
        await clock.settle()
        clock.advance(10)
        outcome = await scheduler.run_now("vm")
        assert outcome == {"result": "ok", "run": 1}
        assert plan.runs == [("vm", clock.time())]
        # The next one is a full frequency after the one run on request.
        clock.advance(FREQUENCY - 1)
        await clock.settle()
        assert len(plan.runs) == 1
        clock.advance(1)
        await clock.settle()
        assert len(plan.runs) == 2

    run(test)


def test_wake_starts_a_sleeping_key_and_spawns_a_missing_one() -> None:
    async def test(clock: FakeClock, plan: Plan, scheduler: CycleScheduler) -> None:
        scheduler.spawn("a")
        await clock.settle()
        scheduler.wake("a")
        scheduler.wake("b")  # never spawned: wake starts it
        await clock.settle()
        assert sorted(key for key, _ in plan.runs) == ["a", "b"]

    run(test)


def test_a_gone_relationship_ends_its_task_and_answers_its_waiters() -> None:
    async def test(clock: FakeClock, plan: Plan, scheduler: CycleScheduler) -> None:
        plan.gone.add("vm")
        outcome = await scheduler.run_now("vm")
        assert outcome == {"result": "skipped", "reason": "not replicating"}
        assert plan.runs == []
        assert clock.waiting == 0  # nothing sleeps for it any more

    run(test)


def test_a_failing_cycle_is_reported_and_the_schedule_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(clock: FakeClock, plan: Plan, scheduler: CycleScheduler) -> None:
        async def broken(key: str) -> None:
            raise RuntimeError("a bug")

        plan.body = broken
        outcome = await scheduler.run_now("vm")
        assert outcome == {"result": "failure", "error": "RuntimeError: a bug"}
        plan.body = None
        clock.advance(FREQUENCY)
        await clock.settle()
        assert len(plan.runs) == 2  # the task lives on

    run(test)
    assert "test cycle of vm failed unexpectedly" in caplog.text


def test_a_slow_cycle_delays_only_its_own_key() -> None:
    async def test(clock: FakeClock, plan: Plan, scheduler: CycleScheduler) -> None:
        release = asyncio.Event()

        async def slow(key: str) -> None:
            if key == "slow":
                await release.wait()

        plan.body = slow
        scheduler.spawn("slow")
        scheduler.spawn("fast")
        await clock.settle()
        for _ in range(3):
            clock.advance(FREQUENCY)
            await clock.settle()
        assert [k for k, _ in plan.runs].count("fast") == 3
        assert [k for k, _ in plan.runs].count("slow") == 1  # still in its first cycle
        release.set()
        await clock.settle()

    run(test)


def test_a_cycle_holds_the_keys_turn() -> None:
    held: list[str] = []

    @contextlib.asynccontextmanager
    async def turn(key: str) -> AsyncIterator[None]:
        held.append(f"take {key}")
        yield
        held.append(f"give {key}")

    async def test(clock: FakeClock, plan: Plan, scheduler: CycleScheduler) -> None:
        async def body(key: str) -> None:
            held.append(f"cycle {key}")

        plan.body = body
        await scheduler.run_now("vm")

    run(test, turn=turn)
    assert held == ["take vm", "cycle vm", "give vm"]


def test_stop_and_shutdown_end_the_tasks_and_cancel_waiters() -> None:
    async def test(clock: FakeClock, plan: Plan, scheduler: CycleScheduler) -> None:
        started = asyncio.Event()

        async def forever(key: str) -> None:
            started.set()
            await asyncio.Event().wait()

        plan.body = forever
        waiter = asyncio.ensure_future(scheduler.run_now("vm"))
        await started.wait()
        await scheduler.stop("vm")
        await clock.settle()
        assert waiter.cancelled()
        scheduler.spawn("other")
        await clock.settle()
        assert clock.waiting == 1
        await scheduler.shutdown()
        assert clock.waiting == 0
        clock.advance(10 * FREQUENCY)
        await clock.settle()
        assert [k for k, _ in plan.runs] == ["vm"]

    run(test)


def test_the_fake_clock_waits_for_its_event_or_its_deadline() -> None:
    async def main() -> None:
        clock = FakeClock(now=100.0)
        event = asyncio.Event()
        timed = asyncio.ensure_future(clock.wait(event, 5))
        woken = asyncio.ensure_future(clock.wait(event, 50))
        await clock.settle()
        assert clock.next_deadline() == 105.0 and clock.waiting == 2
        clock.advance(5)
        await clock.settle()
        assert timed.done() and timed.result() is False
        event.set()
        await clock.settle()
        assert woken.result() is True
        assert clock.waiting == 0
        assert await clock.wait(event, 0) is True  # already set

    asyncio.run(main())
