"""Local processes of a lab or a test (agents, etcd): a free loopback port, a log's last line,
and ending a process by pid only while its command line still names what we started."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def last_line(path: Path) -> str:
    """The last non-empty line of a log, for a one-line error."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def names(pid: int, marker: bytes) -> bool:
    """``pid`` is alive and ``marker`` is one of its arguments (a zombie has none)."""
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def terminate(pid: int, marker: bytes, timeout_s: float) -> None:
    """SIGTERM ``pid``, SIGKILL it if it lives on after ``timeout_s``; wait until it is gone.

    Only while its command line carries ``marker``: a pid reused by another
    process is left alone.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not names(pid, marker):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while names(pid, marker) and time.monotonic() < deadline:
            time.sleep(0.05)
