"""loopback.terminate, which ends an agent a failed ``lab up`` started (and lab down's)."""

from __future__ import annotations

import subprocess
import time

from ferry.adapters import loopback


def _started(proc: subprocess.Popen[bytes]) -> None:
    """Until the child has exec'd ``sleep`` (before that it has Python's command line)."""
    deadline = time.monotonic() + 5
    while not loopback.names(proc.pid, b"sleep"):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_process_is_ended_by_sigterm() -> None:
    proc = subprocess.Popen(["sleep", "600"])
    _started(proc)
    loopback.terminate(proc.pid, b"sleep", 15)
    assert proc.wait(timeout=5) == -15


def test_one_that_ignores_sigterm_is_killed() -> None:
    proc = subprocess.Popen(["bash", "-c", "trap '' TERM; exec sleep 600"])
    _started(proc)
    loopback.terminate(proc.pid, b"sleep", 0.5)
    assert proc.wait(timeout=5) == -9


def test_a_pid_without_the_marker_is_left_alone() -> None:
    proc = subprocess.Popen(["sleep", "600"])
    _started(proc)
    try:
        loopback.terminate(proc.pid, b"ferry", 0.5)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
