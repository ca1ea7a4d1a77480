"""One asyncio task per relationship that runs its cycles when they are due.

Used by replication (primary -> replica) and extended replication (replica
-> extended host). A task sleeps until ``delay(key)`` seconds have passed or
someone wakes it (``run_now``, a resumed relationship), then runs
``cycle(key)`` under the key's lock. ``delay`` returning None ends the task
(the relationship is gone). A slow cycle only delays its own key.

Time comes from a :class:`~ferry.core.clock.Clock`, so the unit tests drive
the scheduler with :class:`ferry.testing.clock.FakeClock`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from ferry.core.clock import SYSTEM_CLOCK, Clock
from ferry.core.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Outcome = dict[str, Any]


class CycleScheduler:
    def __init__(self, kind: str, *, delay: Callable[[str], float | None],
                 cycle: Callable[[str], Awaitable[Outcome]],
                 turn: Callable[[str], AbstractAsyncContextManager[None]] | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:  # fmt: skip
        """``turn(key)``: what a cycle holds while it runs (default: the key's lock)."""
        self.kind = kind
        self.clock = clock
        self._turn = turn
        self._delay = delay
        self._cycle = cycle
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._waiters: defaultdict[str, list[asyncio.Future[Outcome]]] = defaultdict(list)
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def spawn(self, key: str) -> None:
        if key in self._tasks and not self._tasks[key].done():
            return
        self._wake[key] = asyncio.Event()
        self._tasks[key] = asyncio.create_task(self._run(key), name=f"{self.kind}-{key}")

    def wake(self, key: str) -> None:
        self.spawn(key)
        self._wake[key].set()

    async def run_now(self, key: str) -> Outcome:
        """Run a cycle now (after the one in progress, if any) and return its outcome."""
        self.spawn(key)
        waiter: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiters[key].append(waiter)
        self._wake[key].set()
        return await waiter

    def cancel(self, key: str) -> asyncio.Task[None] | None:
        """Stop the key's task (not awaited); the caller may await what is returned."""
        task = self._tasks.pop(key, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            return task
        return None

    async def stop(self, key: str) -> None:
        task = self.cancel(key)
        if task is not None:
            await cancel_and_wait(task)

    async def shutdown(self) -> None:
        await cancel_and_wait(*self._tasks.values())
        self._tasks.clear()

    async def _run(self, key: str) -> None:
        wake = self._wake[key]
        while True:
            delay = self._delay(key)
            if delay is None:
                for waiter in self._waiters.pop(key, []):
                    if not waiter.done():
                        waiter.set_result({"result": "skipped", "reason": "not replicating"})
                return
            await self.clock.wait(wake, delay)
            wake.clear()
            waiters, self._waiters[key] = self._waiters[key], []
            try:
                async with self._turn(key) if self._turn else self.locks[key]:
                    outcome = await self._cycle(key)
            except asyncio.CancelledError:
                for waiter in waiters:
                    waiter.cancel()
                raise
            except Exception as exc:  # never let one VM's bug end its task silently
                log.exception("%s cycle of %s failed unexpectedly", self.kind, key)
                outcome = {"result": "failure", "error": f"{type(exc).__name__}: {exc}"}
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(outcome)
