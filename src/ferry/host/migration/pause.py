"""What the source learns about a move's pause: the peer's clock, the marks, the figures.

The move job asks the destination's agent for its clock a few times before
the memory stream starts (:func:`measure_offset`, over the same mutual-TLS
channel as every other step), notes the switch-over's marks as they happen
(:class:`PauseMarks`: the source QEMU's STOP event, the mirrors completed,
``migrate-continue``, ``completed``; the destination reports when it had
loaded the stream and its QEMU's RESUME event), and builds the move result's
pause fields from them (:meth:`PauseMarks.result`) with
:mod:`ferry.core.pause`'s arithmetic.

``downtime_ms`` is STOP -> RESUME with the clocks lined up
(``downtime_source: "qemu-events"``). If either event is missing it falls
back, and says so (``"agent"``), to what the source agent itself saw: from
hearing ``pre-switchover`` (after the STOP) to the destination's reply that
it runs the guest (after the RESUME), which still holds the whole pause.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ferry.core.pause import (
    COMPLETED,
    CONTINUED,
    LOADED,
    MIRRORS_DONE,
    RESUMED,
    STOPPED,
    ClockOffset,
    ClockSample,
    estimate_offset,
    pause_ms,
    phase_breakdown,
)
from ferry.errors import FerryError
from ferry.peer import migration as wire
from ferry.peer.client import PeerClient

log = logging.getLogger(__name__)

CLOCK_SAMPLES = 4


async def measure_offset(peer: PeerClient, job_id: str) -> ClockOffset | None:
    """The destination's clock minus ours, from ``CLOCK_SAMPLES`` status calls (None: no answer)."""
    samples = []
    for _ in range(CLOCK_SAMPLES):
        sent = time.time()
        try:
            reply = await peer.call(wire.STATUS, id=job_id)
        except FerryError as exc:
            log.info("move %s: clock sample failed: %s", job_id, exc)
            continue
        received = time.time()
        if reply.clock is not None:
            samples.append(ClockSample(sent, reply.clock, received))
    return estimate_offset(samples) if samples else None


@dataclass
class PauseMarks:
    """The switch-over's marks (seconds since the epoch) and what came of them."""

    offset: ClockOffset | None = None
    local: dict[str, float] = field(default_factory=dict)  # source clock
    remote: dict[str, float] = field(default_factory=dict)  # destination clock
    heard_paused: float | None = None  # the agent heard pre-switchover
    resumed_reply: float | None = None  # the agent heard the destination runs it
    postcopy: bool = False

    def note(self, mark: str, at: float | None = None) -> None:
        self.local[mark] = time.time() if at is None else at

    def arrived(self, outcome: wire.IncomingOutcome) -> None:
        """The destination's word that it runs the guest, with its own marks."""
        self.resumed_reply = time.time()
        if outcome.loaded_at is not None:
            self.remote[LOADED] = outcome.loaded_at
        if outcome.resumed_at is not None:
            self.remote[RESUMED] = outcome.resumed_at
        # Post-copy is what the destination resumed in, not what the source asked for.
        self.postcopy = outcome.loaded_status == "postcopy-active"

    def result(self, *, qemu_downtime_ms: int, postcopy_bytes: int = 0) -> dict[str, Any]:
        """The move result's pause fields (``postcopy_bytes``: QEMU's count after the switch)."""
        offset = self.offset or ClockOffset(0.0, 0.0)
        stopped, resumed = self.local.get(STOPPED), self.remote.get(RESUMED)
        if stopped is not None and resumed is not None and self.offset is not None:
            downtime, source = pause_ms(stopped, resumed, offset), "qemu-events"
        else:
            start = self.heard_paused or self.local.get(MIRRORS_DONE) or time.time()
            end = self.resumed_reply or time.time()
            downtime, source = max(1, round((end - start) * 1000)), "agent"
            log.warning("move pause from the agent's own marks: no %s",
                        "clock offset" if stopped and resumed else "STOP/RESUME event")  # fmt: skip
        marks = {**self.local, **self.remote}
        return {
            "downtime_ms": downtime,
            "downtime_source": source,
            "qemu_downtime_ms": qemu_downtime_ms,
            "pause_phases_ms": phase_breakdown(marks, offset),
            "clock_offset_ms": round(offset.offset * 1000, 3),
            "clock_error_ms": round(offset.error * 1000, 3),
            "postcopy": self.postcopy or postcopy_bytes > 0,
            "postcopy_bytes": postcopy_bytes,
        }


__all__ = ["COMPLETED", "CONTINUED", "MIRRORS_DONE", "STOPPED", "PauseMarks", "measure_offset"]
