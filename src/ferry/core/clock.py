"""The clock a long-lived task waits on: the narrow interface, and the real one.

A :class:`Clock` tells the time and waits for an event with a timeout. Code
that schedules (the replication cycle scheduler) takes one, so unit tests can
use :class:`ferry.testing.clock.FakeClock` and move time by hand instead of
sleeping. No I/O here: the real clock reads ``time.time()`` and waits on the
event loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch."""
        ...

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait until ``event`` is set (True) or ``timeout`` seconds passed (False)."""
        ...


class SystemClock:
    """Wall-clock time and the event loop's timers."""

    def time(self) -> float:
        return time.time()

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True


SYSTEM_CLOCK = SystemClock()
