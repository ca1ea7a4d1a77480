"""Parsing and printing of the sizes and durations admins type.

Sizes accept ``256M``, ``1G``, ``1.5GiB``, ``4096`` (bytes); binary units
throughout (``1G`` is 1024**3), as qemu-img does. Durations accept ``30s``,
``5m``, ``15m``, ``1h``.
"""

from __future__ import annotations

import datetime as dt
import re

from ferry.errors import InvalidInputError

_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+)\s*(s|m|h)?\s*$", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600}


def parse_size(text: str, *, what: str = "size") -> int:
    """Return the number of bytes in ``text``; raise for anything else."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise InvalidInputError(
            f"invalid {what} {text!r}: use a positive number with an optional unit, "
            "e.g. 256M, 1G, 1.5GiB"
        )
    number, unit = match.groups()
    value = int(float(number) * _UNITS[unit.upper()])
    if value <= 0:
        raise InvalidInputError(f"invalid {what} {text!r}: it must be larger than zero")
    return value


def format_size(nbytes: int) -> str:
    """Print ``nbytes`` the short way admins read it (``256M``, ``1.5G``)."""
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit]
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{nbytes}B"


def parse_duration(text: str, *, what: str = "duration") -> int:
    """Return the number of seconds in ``text`` (``30s``, ``5m``)."""
    match = _DURATION_RE.match(text)
    if match is None or int(match.group(1)) <= 0:
        raise InvalidInputError(f"invalid {what} {text!r}: use e.g. 30s, 5m, 15m")
    return int(match.group(1)) * _SECONDS[(match.group(2) or "s").lower()]


def parse_start_time(text: str, *, now: dt.datetime) -> float:
    """When to start something later: ``HH:MM`` (its next occurrence, local
    time), an ISO date-time (``2026-11-26T02:00``), or a delay (``2h``, ``30m``).
    Returns a Unix time, which must not be in the past."""
    value = text.strip()
    if _DURATION_RE.match(value):
        return now.timestamp() + parse_duration(value, what="delay")
    try:
        if len(value) <= 5 and ":" in value:
            hour, minute = (int(part) for part in value.split(":"))
            at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
            if at <= now:
                at += dt.timedelta(days=1)
        else:
            at = dt.datetime.fromisoformat(value)
            if at.tzinfo is None:
                at = at.replace(tzinfo=now.tzinfo)
    except ValueError:
        raise InvalidInputError(
            f"invalid start time {text!r}: use HH:MM, 2026-11-26T02:00 or a delay like 2h"
        ) from None
    if at < now:
        raise InvalidInputError(f"start time {text!r} is in the past")
    return at.timestamp()
