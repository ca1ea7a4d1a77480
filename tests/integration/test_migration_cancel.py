"""Cancelling a live move in its first phases, for real: two lab agents, one test guest.

Each cancel lands at another early point (the job just made, the destination
preparing its record, the destination's QEMU waiting, the disk mirror just
started); every time the VM must run on in the same QEMU on host-1 only,
host-2 must keep no record, directory or QEMU of it, and the job must end
``cancelled``. The points are found by polling the jobs of both hosts, never
by sleeping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.host.config import load_host_config
from tests.conftest import LabEnv, lab_session, qemu_pids_for, seqs
from tests.integration.test_migration import SlowMove

pytestmark = pytest.mark.integration

NAME = "quitter"
POLL_TIMEOUT_S = 90.0  # generous: the lab shares two cores with other tests
CLEAN_TIMEOUT_S = 30.0
SPARE_DISKS = 7  # a stuck "migrating" copy never clears, so a bound is safe


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, guest_cache: Path) -> Iterator[LabEnv]:
    """Two lab hosts with agents and one test guest on host-1 for the whole module."""
    with lab_session(tmp_path_factory.mktemp("lab")) as env:
        env.lab.up(2)
        # Spare disks make the destination's prepare (one qemu-img each) and the
        # mirror start (two QMP commands each) long enough to cancel inside.
        spares = [arg for _ in range(SPARE_DISKS) for arg in ("--disk", "1M")]
        env.cli("vm", "create", NAME, "--host", "host-1", "--guest", "test", "--memory",
                "128M", "--disk", "32M", *spares, "--start")  # fmt: skip
        env.wait_console(NAME, lambda t: len(seqs(t)) >= 2)
        try:
            yield env
        finally:
            env.cli("vm", "delete", NAME, "--force", check=False)


def jobs_on(env: LabEnv, host: str, kind: str) -> list[dict[str, Any]]:
    return [j for j in env.cli.json("job", "list", "--host", host)
            if j["vm"] == NAME and j["kind"] == kind]  # fmt: skip


class Move(SlowMove):
    """``ferry vm move`` of the guest in its own process, throttled so it stays early."""

    def __init__(self, env: LabEnv, known: set[str]) -> None:
        self.env = env
        self.name = NAME
        self.known = known  # move jobs of earlier tests
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ferry", "vm", "move", NAME, "--to", "host-2",
             "--storage", "copy", "--max-bandwidth", "1M", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, FERRY_HOME=str(env.home)), stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def job(self) -> dict[str, Any] | None:
        fresh = [j for j in jobs_on(self.env, "host-1", "move") if j["id"] not in self.known]
        return fresh[-1] if fresh else None

    def until(self, seen: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Poll until ``seen(job)`` holds for this move's job; the job as it was then."""
        deadline = time.monotonic() + POLL_TIMEOUT_S
        while time.monotonic() < deadline:
            job = self.job()
            if job is not None:
                assert job["state"] not in ("done", "failed", "cancelled"), job
                if seen(job):
                    return job
            time.sleep(0.02)
        raise AssertionError("the move never reached the point to cancel at")


@pytest.fixture
def move(lab: LabEnv) -> Iterator[Move]:
    before = {j["id"] for j in jobs_on(lab, "host-1", "move")}
    started = Move(lab, before)
    try:
        yield started
    finally:
        started.close()


def host2_has_it(env: LabEnv, uuid: str) -> bool:
    listed = uuid in [vm["uuid"] for vm in env.cli.json("vm", "list", "--host", "host-2")]
    vm_dir = load_host_config(env.lab.host(2).config_path).data_dir / "vms" / uuid
    return listed or vm_dir.exists()


def job_end(env: LabEnv, job_id: str) -> str:
    """The job's final state (a Ctrl-C'd CLI leaves before the agent's undo ends)."""
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while True:
        state = str(env.cli.json("job", "show", job_id, "--host", "host-1")["state"])
        if state in ("done", "failed", "cancelled") or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def assert_cancelled_cleanly(env: LabEnv, move: Move, job_id: str, before: dict[str, Any],
                             *, interrupted: bool = False) -> None:  # fmt: skip
    code, err = move.result()
    if interrupted:
        assert code == 130, err  # Ctrl-C: the CLI cancels the job, then leaves
    else:
        assert code != 0 and "cancelled" in err, err
    assert job_end(env, job_id) == "cancelled"
    after = env.vm(NAME, "host-1")
    assert after["state"] == "running" and after["pid"] == before["pid"]
    deadline = time.monotonic() + CLEAN_TIMEOUT_S
    while host2_has_it(env, before["uuid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not host2_has_it(env, before["uuid"]), "host-2 kept a copy of the VM"
    for job in jobs_on(env, "host-2", "incoming"):
        assert job["state"] == "aborted", job
    assert qemu_pids_for(before["uuid"]) == [before["pid"]]  # no QEMU of it on host-2
    hosts = [vm["host"] for vm in env.cli.json("vm", "list") if vm["name"] == NAME]
    assert hosts == ["host-1"]


def cancel_when(env: LabEnv, move: Move, seen: Callable[[dict[str, Any]], bool]) -> str:
    before = env.vm(NAME, "host-1")
    job = move.until(seen)
    env.cli("job", "cancel", job["id"], "--host", "host-1")
    assert_cancelled_cleanly(env, move, job["id"], before)
    return str(job["phase"])


def test_cancel_right_after_the_job_is_made(lab: LabEnv, move: Move) -> None:
    assert cancel_when(lab, move, lambda job: True) in ("queued", "preparing")


def test_cancel_while_the_destination_prepares(lab: LabEnv, move: Move) -> None:
    # The incoming job exists from the destination's prepare on (its record, disks, files).
    def preparing(job: dict[str, Any]) -> bool:
        return job["id"] in [j["id"] for j in jobs_on(lab, "host-2", "incoming")]

    phase = cancel_when(lab, move, preparing)
    assert phase == "preparing"


def test_cancel_once_the_destination_qemu_waits(lab: LabEnv, move: Move) -> None:
    uuid = lab.vm(NAME, "host-1")["uuid"]
    phase = cancel_when(lab, move, lambda job: len(qemu_pids_for(uuid)) == 2)
    assert phase in ("preparing", "copying-disks")


def test_cancel_as_the_disk_mirror_starts(lab: LabEnv, move: Move) -> None:
    assert cancel_when(lab, move, lambda job: job["phase"] == "copying-disks") == "copying-disks"


def test_ctrl_c_of_vm_move_mid_mirror(lab: LabEnv, move: Move) -> None:
    before = lab.vm(NAME, "host-1")
    job = move.until(lambda job: job["phase"] == "copying-disks")
    move.proc.send_signal(signal.SIGINT)  # what Ctrl-C does: the CLI cancels the job
    assert_cancelled_cleanly(lab, move, job["id"], before, interrupted=True)


def test_a_move_after_the_cancels_goes_through(lab: LabEnv) -> None:
    lab.cli("vm", "move", NAME, "--to", "host-2", "--storage", "copy")
    assert lab.vm(NAME)["host"] == "host-2"
    hosts = [vm["host"] for vm in lab.cli.json("vm", "list") if vm["name"] == NAME]
    assert hosts == ["host-2"]
