"""Jobs on one VM's disks take turns (a cycle, a live export, a move), and the
cycle history follows the VM when it moves.

Before turns, a live export during a replication cycle failed one of the two:
both want a backup job on the same disk node. Each test makes one job slow
on purpose (a bandwidth cap), starts the other while it runs, sees the second
report that it waits, and checks that both succeed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.guest.records import read_records
from tests.conftest import LabEnv

pytestmark = pytest.mark.integration

VM = "turns"
DATA = 64 * 1024**2  # on disk1, so a capped copy takes seconds


@pytest.fixture(scope="module")
def vm(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running test guest on host-1 with two disks, replicated to host-2."""
    lab_env.cli("lab", "up", "--hosts", "3", "--no-guest")
    where = tmp_path_factory.mktemp("replicas")
    lab_env.cli("replica-server", "enable", "--host", "host-2", "--storage", str(where),
                "--allow", "host-*")  # fmt: skip
    lab_env.cli("vm", "create", VM, "--host", "host-1", "--guest", "test", "--memory", "128M",
                "--disk", "64M", "--disk", "256M")  # fmt: skip
    disk1 = lab_env.vm(VM)["disks"][1]["path"]
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5c 0 {DATA}", disk1],
                   check=True, capture_output=True)  # fmt: skip
    lab_env.cli("vm", "start", VM)
    lab_env.wait_console(VM, lambda t: t.count("seq ") >= 2)
    try:
        yield VM
    finally:
        lab_env.cli("replication", "remove", VM, check=False)
        for host in ("host-1", "host-2", "host-3"):
            lab_env.cli("vm", "delete", VM, "--force", "--host", host, check=False)
        lab_env.restart_agent(1, replication_max_bandwidth="1G")


def _popen(lab_env: LabEnv, *args: str) -> subprocess.Popen[str]:
    import os

    env = dict(os.environ, FERRY_HOME=str(lab_env.home))
    return subprocess.Popen([sys.executable, "-m", "ferry", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL)  # fmt: skip


def _finish(proc: subprocess.Popen[str], timeout: float = 180) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args} failed: {err.strip()}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _api(lab_env: LabEnv, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One call to host-1's agent from this process (a CLI start-up costs a second)."""
    from ferry.client.fleet import Fleet
    from ferry.client.settings import load_settings

    async def call() -> Any:
        async with Fleet(load_settings(lab_env.home)) as fleet:
            return await fleet.client("host-1").call(method, path, body=body)

    return asyncio.run(call())


def _wait_busy(lab_env: LabEnv, holder: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _api(lab_env, "GET", f"/v1/vms/{VM}").get("busy") != holder:
        assert time.monotonic() < deadline, f"VM {VM} never became busy with {holder}"
        time.sleep(0.05)


def _wait_job(lab_env: LabEnv, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = _api(lab_env, "GET", f"/v1/jobs/{job_id}")
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} did not end: {job}"
        time.sleep(0.2)


def _export_job(lab_env: LabEnv, folder: str) -> dict[str, Any]:
    jobs = [j for j in lab_env.cli.json("job", "list") if j["kind"] == "export"
            and j.get("target", "").endswith(folder)]  # fmt: skip
    assert len(jobs) == 1, jobs
    return jobs[0]


def test_a_live_export_waits_for_the_replication_cycle_that_runs(
    lab_env: LabEnv, vm: str, tmp_path: Path
) -> None:
    # The initial copy (a cycle) carries 64 MiB at 4 MiB/s: about 16 s.
    lab_env.restart_agent(1, replication_max_bandwidth="4M")
    enable = _popen(lab_env, "replication", "enable", vm, "--replica", "host-2",
                    "--frequency", "5m", "--compression", "off", "--json")  # fmt: skip
    _wait_busy(lab_env, "a replication cycle")
    images = Path(lab_env.lab.root) / "images"
    started = _api(lab_env, "POST", f"/v1/vms/{vm}/export",
                   {"to": str(images / "during-cycle"), "live": True})  # fmt: skip
    deadline = time.monotonic() + 30
    while not (_api(lab_env, "GET", f"/v1/jobs/{started['id']}").get("progress") or {}).get(
        "waiting"
    ):
        assert time.monotonic() < deadline, "the export never said it waits"
        time.sleep(0.05)
    job = _api(lab_env, "GET", f"/v1/jobs/{started['id']}")
    assert job["progress"]["waiting"] == "waiting for a replication cycle to finish"
    assert _finish(enable)["state"] == "replicating"
    exported = _wait_job(lab_env, started["id"])
    assert exported["state"] == "done", exported
    assert exported["result"]["live"] is True
    # The job keeps why it took longer.
    assert exported["waited_for"] == "waiting for a replication cycle to finish"
    for index in (0, 1):
        scan = read_records(images / "during-cycle" / f"disk{index}.qcow2")
        assert scan.corrupt == 0 and scan.count > 0


def test_a_cycle_waits_for_the_live_export_that_runs(lab_env: LabEnv, vm: str) -> None:
    images = Path(lab_env.lab.root) / "images"
    export = _popen(lab_env, "vm", "export", vm, "--to", str(images / "before-cycle"),
                    "--live", "--max-bandwidth", "32M", "--json")  # fmt: skip
    _wait_busy(lab_env, "a live export")
    sync = _popen(lab_env, "replication", "sync", vm, "--json")
    exported = _finish(export)
    assert exported["result"] == "ok"
    assert "waited_for" not in _export_job(lab_env, "before-cycle")
    outcome = _finish(sync)
    assert outcome["result"] == "ok", outcome


def test_cycle_history_follows_the_vm_when_it_moves(lab_env: LabEnv, vm: str) -> None:
    before = lab_env.cli.json("replication", "status", vm)
    assert before["success_count"] >= 1
    lab_env.cli("vm", "move", vm, "--to", "host-3")
    after = lab_env.cli.json("replication", "status", vm)
    assert after["primary"] == "host-3"
    assert after["success_count"] >= before["success_count"]
    measured = lab_env.cli.json("replication", "measure", vm)
    assert measured["success_count"] >= before["success_count"], measured
    assert measured["replicated_bytes"] >= DATA
    lab_env.cli("replication", "sync", vm)
    again = lab_env.cli.json("replication", "status", vm)
    assert again["success_count"] == after["success_count"] + 1
