"""Failover through the CLI and real agents: host-1 primary, host-2 replica, and back.

The guest's own records are the judge: a VM started from a recovery point
reports ``up last-seq=N`` for exactly the records that point holds, and a
planned failover loses none.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.guest.records import read_records
from tests.conftest import UP, LabEnv, seqs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def servers(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each host accepts replication from the other (so replication can flow back)."""
    root = tmp_path_factory.mktemp("replicas")
    for me, other in (("host-1", "host-2"), ("host-2", "host-1")):
        lab_env.cli("replica-server", "enable", "--host", me, "--storage", str(root / me),
                    "--allow", other)  # fmt: skip
    return root


@pytest.fixture
def vm(lab_env: LabEnv, servers: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    name = request.node.name.removeprefix("test_").replace("_", "-")[:24].rstrip("-")
    lab_env.cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "128M",
                "--disk", "64M", "--start")  # fmt: skip
    lab_env.wait_console(name, lambda t: t.count("seq ") >= 2, host="host-1")
    lab_env.cli("replication", "enable", name, "--replica", "host-2", "--frequency", "30s",
                "--recovery-points", "1")  # fmt: skip
    yield name
    for host in ("host-1", "host-2"):
        lab_env.cli("replication", "remove", name, "--host", host, check=False)
    for suffix in ("-test", ""):
        for host in ("host-1", "host-2"):
            lab_env.cli("vm", "delete", name + suffix, "--force", "--host", host, check=False)


def console(lab_env: LabEnv, name: str, host: str) -> str:
    return lab_env.cli("vm", "console", name, "--host", host).stdout


def up_seq(text: str) -> int:
    found = UP.findall(text)
    assert found, f"no up line in {text[-300:]!r}"
    return int(found[-1])


def sync(lab_env: LabEnv, name: str, host: str = "host-1") -> dict[str, Any]:
    outcome: dict[str, Any] = lab_env.cli.json("replication", "sync", name, "--host", host)
    assert outcome["result"] == "ok", outcome
    return outcome


def more_records(lab_env: LabEnv, name: str, host: str, n: int = 2) -> None:
    seen = console(lab_env, name, host).count("seq ")
    lab_env.wait_console(name, lambda t: t.count("seq ") >= seen + n, host=host)


def point_files(servers: Path, host: str, uuid: str) -> list[Path]:
    return sorted((servers / host / uuid).glob("*-disk0.qcow2"))


def test_test_failover_boots_a_point_while_replication_goes_on(
    lab_env: LabEnv, servers: Path, vm: str
) -> None:
    cli = lab_env.cli
    more_records(lab_env, vm, "host-1")
    point = sync(lab_env, vm)["point"]
    uuid = lab_env.vm(vm, "host-1")["uuid"]
    (latest,) = [f for f in point_files(servers, "host-2", uuid) if f.name.startswith(f"p{point}-")]
    on_point = read_records(latest).last_seq

    started = cli.json("failover", "test", vm)
    assert started["test_vm"] == f"{vm}-test" and started["point"] == point
    test_vm = lab_env.vm(f"{vm}-test", "host-2")
    assert test_vm["state"] == "running" and test_vm["uuid"] != uuid
    text = lab_env.wait_console(f"{vm}-test", lambda t: UP.search(t) is not None, host="host-2")
    assert up_seq(text) == on_point  # exactly the records of that recovery point
    assert "a test failover" in cli.fails("failover", "test", vm)

    # Replication goes on; retention (1 point kept) leaves the test's point alone.
    for _ in range(3):
        more_records(lab_env, vm, "host-1")
        sync(lab_env, vm)
    ids = [p["id"] for p in cli.json("replication", "points", vm)]
    assert ids == [point - 1, point, point + 1, point + 2, point + 3]  # nothing merged
    more_records(lab_env, f"{vm}-test", "host-2")  # the test VM writes on its own overlay

    stopped = cli.json("failover", "stop-test", vm)
    assert stopped["stopped"]
    assert "no VM named" in cli.fails("vm", "show", f"{vm}-test", "--host", "host-2")
    assert not list((servers / "host-2" / uuid).glob("test-*"))
    # The merges that waited ran: 1 kept + the latest.
    assert [p["id"] for p in cli.json("replication", "points", vm)] == [point + 2, point + 3]
    assert "no test failover" in cli.fails("failover", "stop-test", vm)


def test_planned_failover_loses_nothing_and_replication_flows_back(
    lab_env: LabEnv, servers: Path, vm: str
) -> None:
    cli = lab_env.cli
    more_records(lab_env, vm, "host-1")
    sync(lab_env, vm)
    out = cli("failover", "planned", vm, "--json").stdout
    result = json.loads(out.splitlines()[-1])
    assert result["host"] == "host-2"
    last_written = seqs(console(lab_env, vm, "host-1"))[-1]  # the old run, up to its shutdown

    assert lab_env.vm(vm, "host-2")["state"] == "running"
    text = lab_env.wait_console(vm, lambda t: UP.search(t) is not None, host="host-2")
    assert up_seq(text) == last_written  # zero data loss

    # Replication now flows host-2 -> host-1, from the old primary's disks.
    status = wait_for(lambda: cli.json("replication", "status", vm, "--host", "host-2"),
                      lambda s: s["state"] == "replicating")  # fmt: skip
    assert status["primary"] == "host-2" and status["replica"] == "host-1"
    assert lab_env.vm(vm, "host-1")["state"] == "replica"
    jobs = [j for j in cli.json("job", "list", "--host", "host-2") if j["vm"] == vm
            and j["kind"] == "replication-initial"]  # fmt: skip
    assert jobs and jobs[-1]["state"] == "done"
    # Only differences crossed: far less than the 64 MiB disk.
    assert jobs[-1]["bytes_sent"] < 8 * 1024**2
    more_records(lab_env, vm, "host-2")
    assert sync(lab_env, vm, "host-2")["bytes"] < 1024**2


def wait_for(get: Any, done: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if done(value):
            return value
        assert time.monotonic() < deadline, value
        time.sleep(0.5)


def _kill_host1_and_its_vm(lab_env: LabEnv, name: str) -> None:
    pid = lab_env.vm(name, "host-1")["pid"]
    lab_env.kill_agent(1)
    os.kill(pid, signal.SIGKILL)


def test_unplanned_failover_cancel_complete_and_reverse(
    lab_env: LabEnv, servers: Path, vm: str
) -> None:
    cli = lab_env.cli
    first = sync(lab_env, vm)["point"]
    more_records(lab_env, vm, "host-1", 3)
    second = sync(lab_env, vm)["point"]
    line = cli.fails("failover", "start", vm)
    assert "still runs on its primary host 'host-1'" in line  # split brain refused

    _kill_host1_and_its_vm(lab_env, vm)
    # host-1 is lost: its files must not be needed (kernel, initrd, disks).
    lost = lab_env.lab.host(1).data_dir / "vms" / lab_env.vm(vm, "host-2")["uuid"]
    hidden = lost.with_name(lost.name + ".lost")
    lost.rename(hidden)
    try:
        started = cli.json("failover", "start", vm)
        assert started["point"] == second and started["host"] == "host-2"
        uuid = lab_env.vm(vm, "host-2")["uuid"]
        text = lab_env.wait_console(vm, lambda t: UP.search(t) is not None, host="host-2")
        (point_file,) = [f for f in point_files(servers, "host-2", uuid)
                         if f.name.startswith(f"p{second}-")]  # fmt: skip
        assert up_seq(text) == read_records(point_file).last_seq

        cancelled = cli.json("failover", "cancel", vm)
        assert cancelled["cancelled"] and lab_env.vm(vm, "host-2")["state"] == "replica"
        assert not list((servers / "host-2" / uuid).glob("run-*"))

        # An older point this time, then final.
        started = cli.json("failover", "start", vm, "--point", str(first))
        assert started["point"] == first
        text = lab_env.wait_console(vm, lambda t: UP.search(t) is not None, host="host-2")
        assert up_seq(text) < read_records(point_file).last_seq
        done = cli.json("failover", "complete", vm)
        assert done["completed"] and done["point"] == first
        assert "cannot be cancelled" in cli.fails("failover", "cancel", vm)
    finally:
        hidden.rename(lost)
        cli("lab", "up", "--hosts", "2", "--no-guest")
    assert lab_env.vm(vm, "host-1")["state"] in ("crashed", "off")

    reversed_ = cli.json("replication", "reverse", vm)
    assert reversed_["primary"] == "host-2" and reversed_["replica"] == "host-1"
    status = wait_for(lambda: cli.json("replication", "status", vm, "--host", "host-2"),
                      lambda s: s["state"] == "replicating")  # fmt: skip
    jobs = [j for j in cli.json("job", "list", "--host", "host-2") if j["vm"] == vm
            and j["kind"] == "replication-initial"]  # fmt: skip
    assert jobs[-1]["bytes_sent"] < 8 * 1024**2  # differences only, not the 64 MiB disk
    assert status["latest_point"] is not None
    assert re.search(r"replica", lab_env.vm(vm, "host-1")["state"])
