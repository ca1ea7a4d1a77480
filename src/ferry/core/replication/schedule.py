"""When replication cycles run: the allowed frequencies, due times and missed slots.

A cycle is due one period after the previous one started; a due time that
passed by a whole period is missed (see :func:`next_due`). Extended
replication (a replica forwarding to a third host) has its own, longer
frequencies.
"""

from __future__ import annotations

from enum import IntEnum

from ferry.core.replication.lifecycle import ReplicationState, is_running
from ferry.core.units import parse_duration
from ferry.errors import InvalidInputError


class Frequency(IntEnum):
    """How often a cycle starts, in seconds."""

    FIVE_SECONDS = 5  # continuous replication (at most MAX_CONTINUOUS_VMS per host)
    THIRTY_SECONDS = 30
    FIVE_MINUTES = 300
    FIFTEEN_MINUTES = 900


DEFAULT_FREQUENCY = Frequency.FIVE_MINUTES
_FREQUENCY_TEXT = {5: "5s", 30: "30s", 300: "5m", 900: "15m"}
_CHOICES = "5s, 30s, 5m or 15m"
# Continuous replication: a host runs at most this many VMs at a frequency
# under 30 s (each cycle costs the primary a backup job and the replica a
# link and a merge every few seconds; 10 is what this 2-core host was
# measured to hold under a p99 RPO of 15 s, bench/bench_continuous_replication.py).
MAX_CONTINUOUS_VMS = 10


def check_frequency(seconds: int) -> int:
    """Validate a frequency given in seconds (the API's ``frequency_s``)."""
    if seconds not in set(Frequency):
        raise InvalidInputError(f"invalid replication frequency {seconds}s: use {_CHOICES}")
    return int(seconds)


def parse_frequency(text: str) -> int:
    """Seconds in ``5s``, ``30s``, ``5m`` or ``15m`` (or the same spelt otherwise, ``300s``)."""
    try:
        seconds = parse_duration(text, what="replication frequency")
    except InvalidInputError:
        seconds = 0
    if seconds not in set(Frequency):
        raise InvalidInputError(f"invalid replication frequency {text!r}: use {_CHOICES}")
    return seconds


def format_frequency(seconds: int) -> str:
    return _FREQUENCY_TEXT[check_frequency(seconds)]


def is_continuous(frequency_s: int) -> bool:
    """Continuous replication: cycles every few seconds, points thinned as they age."""
    return frequency_s < Frequency.THIRTY_SECONDS


def check_continuous_slot(frequency_s: int, others: int, *, host: str, vm: str) -> None:
    """Refuse a continuous frequency for ``vm`` when ``others`` VMs of ``host`` already have one."""
    if is_continuous(frequency_s) and others >= MAX_CONTINUOUS_VMS:
        raise InvalidInputError(
            f"host {host!r} already replicates {others} VMs continuously (every "
            f"{format_frequency(frequency_s)}), the most it runs; use 30s for VM {vm!r} or "
            "slow another VM down first"
        )


# Extended replication (replica -> third host) runs every 5 or 15 minutes,
# never more often than the primary feeds the replica.
EXTENDED_FREQUENCIES = (Frequency.FIVE_MINUTES, Frequency.FIFTEEN_MINUTES)


def check_extended_frequency(seconds: int, primary_seconds: int, *, vm: str = "") -> int:
    """An extended frequency is 5m or 15m and not shorter than the primary's."""
    if seconds not in EXTENDED_FREQUENCIES:
        raise InvalidInputError(f"invalid extended replication frequency {seconds}s: use 5m or 15m")
    if seconds < primary_seconds:
        who = f"VM {vm!r}" if vm else "the VM"
        raise InvalidInputError(
            f"extended replication of {who} every {format_frequency(seconds)} would be more "
            f"often than its primary replicates ({format_frequency(primary_seconds)}); "
            f"use {format_frequency(max(primary_seconds, int(Frequency.FIVE_MINUTES)))} or longer"
        )
    return int(seconds)


def default_extended_frequency(primary_seconds: int) -> int:
    return max(int(Frequency.FIVE_MINUTES), primary_seconds)


def next_due(last_started: float | None, frequency_s: int, now: float) -> float:
    """When the next cycle should start; may be in the past (start now).

    Cycles are due one period after the previous cycle *started*, so points
    stay a period apart even after a late start. A due time that passed by a
    whole period or more is missed (:func:`is_missed`); the scheduler records
    a miss for each such slot (:func:`missed_slots`) and this returns the
    latest slot that can still start. So a VM whose cycle overran cannot make
    the scheduler queue a burst of catch-up cycles, and with one task per
    relationship a slow VM delays only itself.
    """
    if last_started is None:
        return now
    return last_started + frequency_s * (1 + missed_slots(last_started, frequency_s, now))


# A paused or failed relationship waits this long between looks at its
# state; resuming it wakes its task at once.
IDLE_DELAY_S = 3600.0
# How often the scheduler looks at an off VM whose cycle is due (a start is seen within it).
VM_OFF_POLL_S = 5.0


def cycle_delay(state: ReplicationState, last_started: float | None, frequency_s: int,
                now: float, *, not_before: float | None = None,
                vm_live: bool = True) -> float:  # fmt: skip
    """Seconds until the scheduler should start the next cycle.

    ``not_before`` holds back an initial copy scheduled for later. A
    relationship that is not running waits for a wake-up. While the VM is off
    its cycle is skipped without a start (its disks do not change), so the
    due time stays in the past: look again a little later instead of at once,
    which would spin.
    """
    if not is_running(state):
        return IDLE_DELAY_S
    if not vm_live:
        return min(float(frequency_s), VM_OFF_POLL_S)
    due = next_due(last_started, frequency_s, now)
    if state is ReplicationState.INITIAL_COPY and not_before is not None:
        due = max(due, not_before)
    return max(0.0, due - now)


def missed_slots(last_started: float | None, frequency_s: int, now: float) -> int:
    """How many due times since ``last_started`` can no longer start."""
    if last_started is None:
        return 0
    late = now - (last_started + frequency_s)
    return max(0, int(late // frequency_s))


def is_missed(due: float, frequency_s: int, now: float) -> bool:
    """A cycle not started within one period of its due time is missed."""
    return now >= due + frequency_s
