"""Continuous replication (``--frequency 5s``) through the CLI and real agents.

One small test guest on host-1 replicated to host-2 every 5 s for about
90 s: points arrive about every 5 s, the points older than a minute are
thinned (so the count stays bounded), ``replication status`` reports the RPO
achieved, and the replica's latest point still equals the primary's disk.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from tests.conftest import LabEnv
from tests.integration.test_replication import (
    assert_replica_equals_primary,
    cleanup,
    enable,
    wait_status,
)

pytestmark = pytest.mark.integration

RUN_S = 75  # long enough for points to age past the minute that keeps every point


@pytest.fixture(scope="module")
def storage(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("replicas")
    lab_env.cli("replica-server", "enable", "--host", "host-2", "--storage", str(where),
                "--allow", "host-1")  # fmt: skip
    return where


@pytest.fixture
def vm(lab_env: LabEnv, storage: Path) -> Iterator[str]:
    name = "cont"
    lab_env.cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "128M",
                "--disk", "64M", "--start")  # fmt: skip
    lab_env.wait_console(name, lambda t: t.count("seq ") >= 2, timeout=240)  # a loaded host
    yield name
    cleanup(lab_env, name)


@pytest.mark.timeout(600)  # ~200 s on a quiet host; a loaded one boots the guest slowly
def test_points_every_five_seconds_thinned_as_they_age(lab_env: LabEnv, vm: str) -> None:
    assert "5s, 30s, 5m or 15m" in lab_env.cli.fails(
        "replication", "enable", vm, "--replica", "host-2", "--frequency", "2s"
    )
    status = enable(lab_env, vm, "--frequency", "5s", "--recovery-points", "24")
    assert status["frequency_s"] == 5
    wait_status(lab_env, vm, lambda s: s["state"] == "replicating" and s["success_count"] >= 1)
    started = time.monotonic()
    times: set[float] = set()
    while time.monotonic() - started < RUN_S:
        times |= {p["time"] for p in lab_env.cli.json("replication", "points", vm)}
        time.sleep(5)
    points = lab_env.cli.json("replication", "points", vm)
    now = time.time()
    ordered = sorted(times)
    gaps = [b - a for a, b in pairwise(ordered)]
    assert len(ordered) >= RUN_S / 5 * 0.6, ordered  # points came about every 5 s...
    assert 4.0 <= statistics.median(gaps) <= 8.0, gaps
    # ... and those older than a minute were thinned: one per 5-minute slot is left.
    recent = [p for p in points if now - p["time"] <= 65]
    older = [p for p in points if now - p["time"] > 65]
    assert len(older) <= 2, points
    assert len(points) < len(ordered), (points, ordered)
    assert len(recent) >= 8, points
    log = (lab_env.lab.root / "hosts" / "host-2" / "agent.log").read_text(errors="replace")
    assert "thinned recovery point" in log
    status = lab_env.cli.json("replication", "status", vm)
    assert status["rpo_s"] is not None and status["rpo_p99_s"] >= status["frequency_s"] * 0.5
    assert status["miss_count"] <= 2, status
    text = lab_env.cli("replication", "status", vm).stdout
    assert "RPO now / p99" in text and "every 5s" in text
    assert_replica_equals_primary(lab_env, vm)
