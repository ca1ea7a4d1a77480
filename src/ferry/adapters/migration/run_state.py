"""When a QEMU's vCPUs stopped and ran again, from its own ``STOP`` and ``RESUME`` events.

The events carry QEMU's timestamp (the host's wall clock), which is the
guest's own view of its pause more closely than any time an agent notes
after a QMP round trip. :func:`run_state_events` listens for the block;
:meth:`RunStateEvents.collect` then drains what was heard without waiting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ferry.adapters.migration.channel import Channel, Events
from ferry.core.pause import event_time

NAMES = ("STOP", "RESUME")


class RunStateEvents:
    """The STOP and RESUME times one listening block heard (seconds since the epoch)."""

    def __init__(self, events: Events) -> None:
        self._events = events
        self.stops: list[float] = []
        self.resumes: list[float] = []

    async def collect(self, wait: float = 0.0) -> None:
        """Take in every event heard so far; with ``wait``, until one more comes or it passes."""
        timeout = max(wait, 0.001)
        while (event := await self._events.next(timeout)) is not None:
            timeout = 0.001
            at = event_time(event)
            if at is None:
                continue
            (self.stops if event.get("event") == "STOP" else self.resumes).append(at)

    async def last_stop(self) -> float | None:
        """The latest STOP heard (None: none, or QEMU gave no timestamp)."""
        await self.collect()
        return self.stops[-1] if self.stops else None

    async def first_resume(self, wait: float = 0.0) -> float | None:
        """The first RESUME heard, waiting up to ``wait`` seconds for it if none came yet."""
        await self.collect()
        if not self.resumes and wait:
            await self.collect(wait)
        return self.resumes[0] if self.resumes else None


@contextlib.contextmanager
def run_state_events(channel: Channel) -> Iterator[RunStateEvents]:
    """Hear ``channel``'s STOP and RESUME events for the block."""
    with channel.listen(*NAMES) as events:
        yield RunStateEvents(events)
