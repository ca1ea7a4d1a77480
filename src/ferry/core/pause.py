"""The guest's pause at a move's switch-over, from timestamps: clock offset, downtime, phases.

A move's honest downtime is the time the guest lives through paused: from
the source QEMU's ``STOP`` event (its vCPUs stopped) to the destination
QEMU's ``RESUME`` event (its vCPUs run). The two timestamps come from two
hosts' clocks, so the destination's is first brought onto the source's
clock with an offset the agents measure over their own TLS channel, NTP's
way: the source notes ``sent``, the destination answers with its clock
``remote``, the source notes ``received``; then ``offset = remote - (sent +
received) / 2``, wrong by at most half the round trip. Of a few samples the
one with the shortest round trip is kept.

The pause is also split into phases by the marks the two sides note on the
way (:data:`PHASES`), which is where a long pause shows what it waited for.
No I/O here.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The marks of a switch-over, in order, and which clock each is on.
STOPPED = "stopped"  # source: STOP event (vCPUs stopped, QEMU's pre-switchover)
MIRRORS_DONE = "mirrors_done"  # source: the disk mirrors completed (a copy)
CONTINUED = "continued"  # source: migrate-continue sent (the last pages go)
COMPLETED = "completed"  # source: the stream completed (the agent heard it)
LOADED = "loaded"  # destination: its incoming side completed loading
RESUMED = "resumed"  # destination: RESUME event (vCPUs run)
PHASES = (STOPPED, MIRRORS_DONE, CONTINUED, COMPLETED, LOADED, RESUMED)
REMOTE_MARKS = frozenset({LOADED, RESUMED})


@dataclass(frozen=True)
class ClockSample:
    """One exchange: the caller's clock when it asked and heard back, the peer's in between."""

    sent: float
    remote: float
    received: float

    @property
    def round_trip(self) -> float:
        return self.received - self.sent

    @property
    def offset(self) -> float:
        """Peer clock minus ours, as this exchange sees it."""
        return self.remote - (self.sent + self.received) / 2


@dataclass(frozen=True)
class ClockOffset:
    """The peer's clock minus ours (seconds), wrong by at most ``error`` seconds."""

    offset: float
    error: float

    def to_local(self, remote_time: float) -> float:
        return remote_time - self.offset


ZERO_OFFSET = ClockOffset(0.0, 0.0)


def estimate_offset(samples: Sequence[ClockSample]) -> ClockOffset:
    """The offset of the sample with the shortest round trip (half of it bounds the error)."""
    valid = [s for s in samples if s.round_trip >= 0]
    if not valid:
        raise ValueError("no clock sample with a non-negative round trip")
    best = min(valid, key=lambda s: s.round_trip)
    return ClockOffset(best.offset, best.round_trip / 2)


def event_time(event: Mapping[str, Any]) -> float | None:
    """A QMP event's ``timestamp`` (seconds since the epoch, host clock), or None."""
    stamp = event.get("timestamp")
    if not isinstance(stamp, Mapping):
        return None
    seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
    if not isinstance(seconds, int) or not isinstance(micros, int) or seconds < 0:
        return None  # QEMU writes -1 when it could not read the clock
    return seconds + micros / 1_000_000


def pause_ms(stopped: float, resumed_remote: float, offset: ClockOffset) -> int:
    """The pause from the source's STOP to the destination's RESUME (its clock), in ms.

    Never 0: a pause shorter than a millisecond (or one the offset's error
    makes look negative) is reported as 1 ms, since the guest did stop.
    """
    ms = (offset.to_local(resumed_remote) - stopped) * 1000
    return max(1, round(ms))


def phase_breakdown(marks: Mapping[str, float], offset: ClockOffset) -> dict[str, int]:
    """Milliseconds from each mark to the next one present (``"a->b"``), on the source clock.

    ``marks`` holds what was noted (a shared-storage move has no
    ``mirrors_done``); the destination's marks (:data:`REMOTE_MARKS`) are on
    its clock and are brought onto ours first.
    """
    local = {name: offset.to_local(t) if name in REMOTE_MARKS else t
             for name, t in marks.items()}  # fmt: skip
    present = [name for name in PHASES if name in local]
    return {f"{a}->{b}": round((local[b] - local[a]) * 1000)
            for a, b in itertools.pairwise(present)}  # fmt: skip
