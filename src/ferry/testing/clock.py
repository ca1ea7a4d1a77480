"""A fake clock: time moves only when a test says so (after trio.testing.MockClock).

``clock.advance(seconds)`` moves the time and wakes every waiter whose
deadline has come; ``await clock.settle()`` lets the tasks that were woken run
until they wait again. Waiters are the tasks in ``clock.wait(event, timeout)``:
each returns True when its event is set first, False when its deadline comes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ferry.core.tasks import cancel_and_wait


@dataclass
class FakeClock:
    now: float = 1_000_000.0
    _deadlines: list[tuple[float, asyncio.Future[None]]] = field(default_factory=list)

    def time(self) -> float:
        return self.now

    @property
    def waiting(self) -> int:
        """How many waits are pending (a deadline not reached, their event not set)."""
        return sum(not future.done() for _, future in self._deadlines)

    def next_deadline(self) -> float | None:
        """The earliest deadline a wait is pending on."""
        pending = [d for d, future in self._deadlines if not future.done()]
        return min(pending) if pending else None

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        if event.is_set():
            return True
        deadline: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self.now + max(0.0, timeout), deadline)
        self._deadlines.append(entry)
        setter = asyncio.ensure_future(event.wait())
        either: set[asyncio.Future[Any]] = {setter, deadline}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            return event.is_set()
        finally:
            await cancel_and_wait(setter)
            if not deadline.done():
                deadline.cancel()
            self._deadlines.remove(entry)

    def advance(self, seconds: float) -> None:
        """Move the time on; waits whose deadline has come end (call :meth:`settle`)."""
        self.now += seconds
        for when, future in list(self._deadlines):
            if when <= self.now and not future.done():
                future.set_result(None)

    async def settle(self, rounds: int = 20) -> None:
        """Let every task that can run, run (until they all wait again)."""
        for _ in range(rounds):
            await asyncio.sleep(0)
