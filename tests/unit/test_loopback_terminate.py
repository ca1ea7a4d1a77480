"""An agent that a failed ``lab up`` started is ended, even one that ignores SIGTERM."""

from __future__ import annotations

import subprocess

import pytest

from ferry import lab


def test_a_process_is_ended_by_sigterm() -> None:
    proc = subprocess.Popen(["sleep", "600"])
    lab._end(proc)
    assert proc.returncode == -15


def test_one_that_ignores_sigterm_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab, "AGENT_STOP_TIMEOUT_S", 0.5)
    proc = subprocess.Popen(["bash", "-c", "trap '' TERM; echo ready; sleep 600"],
                            stdout=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    with proc.stdout:
        assert proc.stdout.readline() == b"ready\n"
        lab._end(proc)
    assert proc.returncode == -9
