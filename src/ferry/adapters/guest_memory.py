"""How much of a running VM's memory is not zero, sampled from its QEMU's address space.

A live migration's first pass sends only the pages that are not zero (QEMU
sends a zero page as a flag), so the planner's estimate needs that share,
and nothing QEMU reports says it (``calc-dirty-rate`` counts changes, not
content). The guest's RAM is the anonymous ``rw-p`` mapping of exactly the
VM's memory size in ``/proc/PID/maps`` (under TCG the translation buffer is
another large anonymous mapping, ``rwxp``, never the memory's size). A few
thousand random pages are read through ``/proc/PID/mem`` (the agent runs
QEMU and may read it) and compared with a zero page; nothing is kept but
the count. Any failure (another size, no permission, the process gone)
answers None: the planner then uses its calibrated guess.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

PAGE = 4096
SAMPLES = 2048
_ZERO = bytes(PAGE)


def _ram_start(pid: int, memory: int) -> int | None:
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) != 5 or not fields[1].startswith("rw-"):
            continue  # a file mapping, or not plain read-write memory
        low, high = (int(part, 16) for part in fields[0].split("-"))
        if high - low == memory:
            return low
    return None


def nonzero_fraction(pid: int, memory: int, *, samples: int = SAMPLES) -> float | None:
    """The share of ``memory`` bytes of guest RAM that is not zero, or None if unknown."""
    start = _ram_start(pid, memory)
    pages = memory // PAGE
    if start is None or pages == 0:
        return None
    picks = random.sample(range(pages), min(samples, pages))
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        used = sum(os.pread(fd, PAGE, start + page * PAGE) != _ZERO for page in picks)
    except OSError:
        return None
    finally:
        os.close(fd)
    return used / len(picks)
