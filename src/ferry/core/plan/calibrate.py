"""The estimate's constants measured from the moves these hosts did recently: pure.

On this lab the fixed costs of a live move (the destination QEMU's start,
the NBD exports and mirrors, the memory stream's start, the switch-over and
finish) vary 2-4x with the machine's load, so constants fitted once miss by
far more than the planner's 30% goal. The last moves of a host are the best
measure of what its next one costs: :func:`calibrate` takes the median of
each fixed part over the newest :data:`WINDOW` finished moves and keeps the
rates (the link, the cap, zero pages) of the model. A move's result says
``total_s``, ``disk_copy_s`` (mirrors until ready) and ``memory_copy_s``
(from the memory stream's start to the end, the pause included); its
progress says how many disk and RAM bytes crossed. Per sample:

- set-up: ``total_s - disk_copy_s - memory_copy_s`` (preparing, the queue);
- disk fixed: ``disk_copy_s`` less the bytes at the cap (copied moves only);
- memory fixed: ``memory_copy_s`` less the pause and the first pass as the
  model counts it (the bytes sent at the cap, the zero pages at their rate);
- switch: the pause itself (``downtime_ms``);
- used fraction: RAM bytes sent over the guest's RAM.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ferry.core.plan.estimate import DEFAULT, Calibration
from ferry.core.plan.plan_file import MoveSample

WINDOW = 8  # the newest moves that count
MIN_SAMPLES = 1  # one measured move here beats constants from another day's load
MOVE_KIND = "move"


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def sample_of(job: Mapping[str, Any]) -> MoveSample | None:
    """A finished live move's job view (``GET /v1/jobs``) as a sample; None for others."""
    result = job.get("result")
    if job.get("kind") != MOVE_KIND or job.get("state") != "done" or not isinstance(result, dict):
        return None
    total = _number(result.get("total_s"))
    if total is None or total <= 0:
        return None
    found = job.get("progress")
    progress: Mapping[str, Any] = found if isinstance(found, dict) else {}
    disk_bytes = _number(progress.get("disk_total"))
    ram_total = _number(progress.get("ram_total"))
    ram_sent = _number(progress.get("ram_bytes"))
    return MoveSample(
        finished=_number(job.get("updated")) or 0.0, total_s=total,
        downtime_ms=_number(result.get("downtime_ms")) or 0.0,
        storage=str(result.get("storage") or "shared"),
        disk_copy_s=_number(result.get("disk_copy_s")) or 0.0,
        disk_bytes=None if disk_bytes is None else int(disk_bytes),
        memory_copy_s=_number(result.get("memory_copy_s")) or 0.0,
        memory_bytes=None if ram_total is None else int(ram_total),
        memory_sent=None if ram_sent is None else int(ram_sent),
    )  # fmt: skip


def samples_of(jobs: Iterable[Mapping[str, Any]]) -> list[MoveSample]:
    """The finished live moves among ``jobs``, newest last, at most :data:`WINDOW`."""
    found = [s for s in (sample_of(j) for j in jobs) if s is not None]
    return sorted(found, key=lambda s: s.finished)[-WINDOW:]


def used(samples: Sequence[MoveSample]) -> int:
    """How many of ``samples`` :func:`calibrate` fits from (0: the default stands)."""
    n = min(len(samples), WINDOW)
    return n if n >= MIN_SAMPLES else 0


def note(samples: Sequence[MoveSample], host: str) -> str:
    """What ``plan show`` says of the estimates from ``host``."""
    n = used(samples)
    if not n:
        return f"estimates from {host}: default constants (no recent moves)"
    return f"estimates calibrated from {n} recent move(s) on {host}"


def _median(values: list[float], default: float) -> float:
    return round(statistics.median(values), 3) if values else default


def calibrate(samples: Sequence[MoveSample], default: Calibration = DEFAULT) -> Calibration:
    """``default`` with its fixed parts replaced by the medians over the newest moves."""
    if not used(samples):
        return default
    recent = sorted(samples, key=lambda s: s.finished)[-WINDOW:]
    rate = default.migration_cap_bps * default.stream_factor
    setup, disk, memory, switch, fraction = [], [], [], [], []
    for s in recent:
        down = s.downtime_ms / 1000
        setup.append(max(0.0, s.total_s - s.disk_copy_s - s.memory_copy_s))
        if s.storage == "copy" and s.disk_copy_s > 0:
            crossed = (s.disk_bytes or 0) / (rate * default.disk_factor)
            disk.append(max(0.0, s.disk_copy_s - crossed))
        if s.memory_copy_s > 0:
            pass_s = 0.0
            if s.memory_bytes:
                sent = s.memory_sent if s.memory_sent is not None else int(
                    s.memory_bytes * default.used_fraction)  # fmt: skip
                sent = min(sent, s.memory_bytes)
                pass_s = sent / rate + (s.memory_bytes - sent) / default.zero_page_bps
                if s.memory_sent is not None:
                    fraction.append(sent / s.memory_bytes)
            memory.append(max(0.0, s.memory_copy_s - down - pass_s))
        if s.downtime_ms > 0:
            switch.append(down)
    return replace(
        default,
        setup_s=_median(setup, default.setup_s),
        disk_fixed_s=_median(disk, default.disk_fixed_s),
        memory_fixed_s=_median(memory, default.memory_fixed_s),
        switch_s=_median(switch, default.switch_s),
        used_fraction=_median(fraction, default.used_fraction),
    )
