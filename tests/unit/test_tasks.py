"""cancel_and_wait: the task ends, its own cancellation is absorbed, the caller's is not."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from ferry.core.tasks import cancel_and_wait


async def _slow_to_stop(stopped: asyncio.Event) -> None:
    """Sleeps forever; when cancelled, takes a moment to clean up first."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(0.05)
        stopped.set()
        raise


def test_the_task_ends_and_the_caller_goes_on() -> None:
    async def main() -> bool:
        stopped = asyncio.Event()
        task = asyncio.create_task(_slow_to_stop(stopped))
        await asyncio.sleep(0)
        await cancel_and_wait(task)
        return task.cancelled() and stopped.is_set()

    assert asyncio.run(main())


def test_several_tasks_all_end() -> None:
    async def main() -> list[bool]:
        events = [asyncio.Event() for _ in range(3)]
        tasks = [asyncio.create_task(_slow_to_stop(e)) for e in events]
        await asyncio.sleep(0)
        await cancel_and_wait(*tasks)
        return [t.cancelled() for t in tasks]

    assert asyncio.run(main()) == [True, True, True]


def test_a_task_that_already_ended_is_fine() -> None:
    async def main() -> None:
        task = asyncio.create_task(asyncio.sleep(0))
        await task
        await cancel_and_wait(task)

    asyncio.run(main())


def test_the_callers_own_cancellation_is_not_swallowed() -> None:
    went_on: list[str] = []

    async def caller(child: asyncio.Task[None]) -> None:
        await cancel_and_wait(child)
        went_on.append("after cancel_and_wait")

    async def main() -> None:
        child = asyncio.create_task(_slow_to_stop(asyncio.Event()))
        await asyncio.sleep(0)
        outer = asyncio.create_task(caller(child))
        await asyncio.sleep(0.01)  # outer now waits for child's cleanup
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        with contextlib.suppress(asyncio.CancelledError):
            await child

    asyncio.run(main())
    assert went_on == []


def test_an_error_the_task_ends_with_propagates() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    async def main() -> None:
        task = asyncio.create_task(fails_on_cancel())
        await asyncio.sleep(0)
        await cancel_and_wait(task)

    with pytest.raises(RuntimeError, match="cleanup failed"):
        asyncio.run(main())


def test_a_cancellation_requested_before_the_call_is_not_swallowed() -> None:
    went_on: list[str] = []

    async def caller(child: asyncio.Task[None]) -> None:
        me = asyncio.current_task()
        assert me is not None
        me.cancel()  # requested, not yet delivered
        await cancel_and_wait(child)
        went_on.append("after cancel_and_wait")

    async def main() -> None:
        child = asyncio.create_task(_slow_to_stop(asyncio.Event()))
        await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(caller(child))
        with contextlib.suppress(asyncio.CancelledError):
            await child

    asyncio.run(main())
    assert went_on == []


def test_cleanup_after_a_cancellation_stops_every_task() -> None:
    """In the ``finally`` of a cancelled task, each cancel_and_wait runs to its end."""
    events = [asyncio.Event(), asyncio.Event()]
    cleaned: list[str] = []

    async def owner() -> None:
        first = asyncio.create_task(_slow_to_stop(events[0]))
        second = asyncio.create_task(_slow_to_stop(events[1]))
        try:
            await asyncio.sleep(3600)
        finally:
            await cancel_and_wait(first)
            cleaned.append("first")
            await cancel_and_wait(second)
            cleaned.append("second")

    async def main() -> None:
        task = asyncio.create_task(owner())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert cleaned == ["first", "second"]
    assert all(e.is_set() for e in events)
