"""Opt-in memory tracing of the agent, for soaks: ``FERRY_TRACEMALLOC=DIR``.

When the variable names a directory, the agent starts ``tracemalloc`` (one
frame per allocation, cheap enough for a soak) and every
``FERRY_TRACEMALLOC_EVERY`` seconds (default 60) appends one JSON line to
``DIR/<host>.jsonl``: seconds since start, traced and peak bytes, ``VmRSS``,
and the 15 allocation sites that grew most since the first snapshot. Flat
traced bytes with a growing RSS is the allocator (arenas, fragmentation), not
a leak in ferry; a site that grows every line is a leak. With
``FERRY_TRACEMALLOC_FRAMES=N`` (N > 1) each allocation keeps N frames and a
growing site is named by its whole stack, innermost first (``stack``), so
who allocated it shows and not only ``json/decoder.py``; each line then also
counts the live QMP messages (:func:`qmp_holders`): by kind, and by the type
of object that holds them. Off by default: it
costs CPU and memory, so production never pays for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import tracemalloc
from pathlib import Path

from ferry.adapters.qemu import qmp_holders

ENV_DIR = "FERRY_TRACEMALLOC"
ENV_EVERY = "FERRY_TRACEMALLOC_EVERY"
ENV_FRAMES = "FERRY_TRACEMALLOC_FRAMES"
TOP = 15


def rss_kib() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else None


def _site(stat: tracemalloc.StatisticDiff) -> dict[str, object]:
    frame = stat.traceback[-1]  # the most recent frame: frames run oldest first
    row: dict[str, object] = {
        "site": f"{frame.filename}:{frame.lineno}", "kib": round(stat.size / 1024, 1),
        "grew_kib": round(stat.size_diff / 1024, 1), "count": stat.count,
        "count_grew": stat.count_diff}  # fmt: skip
    if len(stat.traceback) > 1:  # innermost first
        row["stack"] = [f"{f.filename}:{f.lineno}" for f in reversed(stat.traceback)]
    return row


async def trace_memory(out: Path, every_s: float, frames: int = 1) -> None:
    """Append one line to ``out`` every ``every_s`` seconds until cancelled."""
    tracemalloc.start(frames)
    started = time.monotonic()
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    first = tracemalloc.take_snapshot().filter_traces(ignore)
    try:
        while True:
            await asyncio.sleep(every_s)
            snap = tracemalloc.take_snapshot().filter_traces(ignore)
            current, peak = tracemalloc.get_traced_memory()
            grown = snap.compare_to(first, "traceback" if frames > 1 else "lineno")[:TOP]
            row: dict[str, object] = {
                "t": round(time.monotonic() - started), "traced_kib": current // 1024,
                "peak_kib": peak // 1024, "rss_kib": rss_kib(),
                "top_growth": [_site(s) for s in grown]}  # fmt: skip
            if frames > 1:
                row["qmp_messages"] = qmp_holders()
            with out.open("a") as file:
                file.write(json.dumps(row) + "\n")
    finally:
        tracemalloc.stop()


def start_if_asked(host: str) -> asyncio.Task[None] | None:
    """The tracing task when ``FERRY_TRACEMALLOC`` names a directory, else None."""
    folder = os.environ.get(ENV_DIR)
    if not folder or not Path(folder).is_dir():
        return None
    every = float(os.environ.get(ENV_EVERY) or 60)
    frames = max(1, int(os.environ.get(ENV_FRAMES) or 1))
    out = Path(folder) / f"{host}.jsonl"
    return asyncio.create_task(trace_memory(out, every, frames), name="memtrace")
