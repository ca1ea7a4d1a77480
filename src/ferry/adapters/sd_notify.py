"""systemd's readiness protocol (``sd_notify``), written out: no libsystemd needed.

The service manager sets ``$NOTIFY_SOCKET`` to an ``AF_UNIX`` datagram socket,
a path or, with a leading ``@``, a name in the abstract namespace. Each
datagram is newline-separated ``KEY=VALUE`` lines: ``READY=1`` once the
service serves (``Type=notify`` waits for it), ``STATUS=...`` for
``systemctl status``, ``STOPPING=1`` on the way down, ``WATCHDOG=1`` at least
every ``$WATCHDOG_USEC`` microseconds when the unit sets ``WatchdogSec``.
Without ``$NOTIFY_SOCKET`` (run by hand, in tests, in the lab) every call is
a no-op. A notification that cannot be sent is logged, never raised: the
agent must not stop serving because its supervisor went away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def _address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()  # abstract namespace: a leading NUL byte
    if raw.startswith("/"):
        return raw
    return None  # e.g. vsock: addresses systemd may hand out that ferry does not speak


def notify(**fields: str) -> bool:
    """Send ``KEY=VALUE`` lines (``notify(READY="1", STATUS="serving")``); True if sent."""
    raw = os.environ.get(NOTIFY_SOCKET, "")
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a unix socket; systemd is not told", raw)
        return False
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", raw, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """How often to send ``WATCHDOG=1`` (half systemd's timeout), or None if none is asked.

    ``$WATCHDOG_PID``, when set, names the process meant; another one stays quiet.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


async def keep_watchdog(interval: float) -> None:
    """Ping the watchdog until cancelled: a loop that stops answering is a hung agent."""
    while True:
        notify(WATCHDOG="1")
        await asyncio.sleep(interval)
