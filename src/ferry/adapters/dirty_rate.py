"""A running VM's memory dirty rate, measured by its QEMU (QMP ``calc-dirty-rate``).

The mode is ``page-sampling``: QEMU hashes a sample of guest pages at the
start and end of the period and scales the share that changed to the whole
memory. It works under TCG and KVM alike; ``dirty-bitmap`` mode made QEMU
7.2 under TCG drop its QMP connection here, and ``dirty-ring`` needs KVM's
dirty ring. QEMU reports MiB/s, rounded down to whole numbers, and counts a
page once per period however often it changed; one measurement runs at a
time per VM (a second ``calc-dirty-rate`` during one is refused).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ferry.adapters.qemu import QmpChannel
from ferry.errors import QemuError

MIN_SECONDS = 1
MAX_SECONDS = 2
SAMPLE_PAGES = 1024  # per GiB of guest memory (QEMU's default is 512)
POLL_S = 0.1


@dataclass(frozen=True)
class DirtyRate:
    bytes_per_s: float
    calc_time_s: int
    sample_pages: int
    took_s: float


async def measure(channel: QmpChannel, *, seconds: int = MIN_SECONDS) -> DirtyRate:
    """Measure over ``seconds`` (1 or 2) and wait for the answer (bounded)."""
    seconds = min(max(seconds, MIN_SECONDS), MAX_SECONDS)
    started = time.monotonic()
    await channel.execute("calc-dirty-rate", {"calc-time": seconds, "mode": "page-sampling",
                                              "sample-pages": SAMPLE_PAGES})  # fmt: skip
    deadline = started + seconds + 5.0
    while True:
        await asyncio.sleep(POLL_S)
        info = await channel.execute("query-dirty-rate")
        if info.get("status") == "measured":
            mib_s = float(info.get("dirty-rate", 0))
            return DirtyRate(mib_s * 1024**2, int(info.get("calc-time", seconds)),
                             int(info.get("sample-pages", SAMPLE_PAGES)),
                             round(time.monotonic() - started, 3))  # fmt: skip
        if time.monotonic() > deadline:
            raise QemuError(f"QEMU of VM {channel.name!r} gave no dirty rate within "
                            f"{seconds + 5} s (status {info.get('status')!r})")  # fmt: skip
