"""Failover through the CLI and real agents: host-1 primary, host-2 replica, and back.

The guest's own records are the judge: a VM started from a recovery point
reports ``up last-seq=N`` for exactly the records that point holds, and a
planned failover loses none.
"""

from __future__ import annotations

import asyncio
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
from tests.conftest import UP, LabEnv, same_image, seqs

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


def final(cli: Any, *args: str) -> Any:
    """A job-following command's result: the last of its JSON lines (events come first)."""
    return followed(cli, *args)[0]


def followed(cli: Any, *args: str) -> tuple[Any, str]:
    """A job-following command's result and its job's id (the events name it)."""
    lines = cli(*args, "--json").stdout.splitlines()
    assert all(json.loads(line).get("event") == "progress" for line in lines[:-1]), lines
    return json.loads(lines[-1]), json.loads(lines[0])["id"]


def history(cli: Any, job_id: str, host: str) -> list[tuple[str, str]]:
    """(state, phase) of every step of the job, as 'ferry job show --json' records them."""
    job = cli.json("job", "show", job_id, "--host", host)
    return [(step["state"], step["phase"]) for step in job["history"]]


def walked(*phases: str) -> list[tuple[str, str]]:
    """The history of a failover job that ran through ``phases`` and ended done."""
    return [*(("running", phase) for phase in phases), ("done", "done")]


def console(lab_env: LabEnv, name: str, host: str) -> str:
    return lab_env.console(name, host)


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


def fresh_point(lab_env: LabEnv, servers: Path, name: str) -> tuple[int, str, Path]:
    """New records, a cycle: the new point's id, the VM's UUID and the point's disk0 file."""
    more_records(lab_env, name, "host-1")
    point = sync(lab_env, name)["point"]
    uuid = lab_env.vm(name, "host-1")["uuid"]
    (found,) = [f for f in point_files(servers, "host-2", uuid) if f.name.startswith(f"p{point}-")]
    return point, uuid, found


def test_test_failover_boots_a_point_while_replication_goes_on(
    lab_env: LabEnv, servers: Path, vm: str
) -> None:
    cli = lab_env.cli
    point, uuid, latest = fresh_point(lab_env, servers, vm)
    on_point = read_records(latest).last_seq

    started, test_job = followed(cli, "failover", "test", vm)
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
    # Nothing merged: every point from the one before the test's on is there (a
    # scheduled 30 s cycle may have added one more than our three syncs).
    assert ids == list(range(point - 1, ids[-1] + 1)) and ids[-1] >= point + 3, ids
    more_records(lab_env, f"{vm}-test", "host-2")  # the test VM writes on its own overlay
    # Read after the cycles above: each CLI call here delays them (30 s frequency).
    assert history(cli, test_job, "host-2") == walked("starting", "creating-overlays",
                                                      "starting-vm")  # fmt: skip

    stopped, job_id = followed(cli, "failover", "stop-test", vm)
    assert stopped["stopped"]
    assert history(cli, job_id, "host-2") == walked("starting", "deleting-vm", "merging")
    assert "no VM named" in cli.fails("vm", "show", f"{vm}-test", "--host", "host-2")
    assert not list((servers / "host-2" / uuid).glob("test-*"))
    # The merges that waited ran: 1 kept + the latest.
    kept = [p["id"] for p in cli.json("replication", "points", vm)]
    assert len(kept) == 2 and kept[1] == kept[0] + 1 and kept[0] >= point + 2, kept
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
    planned = json.loads(out.splitlines()[0])["id"]
    assert history(cli, planned, "host-1") == walked("checking", "shutting-down", "final-cycle",
                                                     "starting-on-replica")  # fmt: skip
    last_written = seqs(console(lab_env, vm, "host-1"))[-1]  # the old run, up to its shutdown

    assert lab_env.vm(vm, "host-2")["state"] == "running"
    text = lab_env.wait_console(vm, lambda t: UP.search(t) is not None, host="host-2")
    # Zero data loss. The guest writes a record, then prints it, so a shutdown between
    # the two leaves one record on disk that the console never showed: at most one more.
    assert last_written <= up_seq(text) <= last_written + 1

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


def test_planned_failover_is_refused_when_replication_could_not_flow_back(
    lab_env: LabEnv, servers: Path
) -> None:
    """An older primary (level 2) replicating to a newer replica (3): no way back after."""
    cli = lab_env.cli
    name = "older-primary"
    lab_env.restart_agent(1, functional_level=2)
    try:
        cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "128M",
            "--disk", "64M", "--start")  # fmt: skip
        lab_env.wait_console(name, lambda t: "seq " in t, host="host-1")
        cli("replication", "enable", name, "--replica", "host-2", "--frequency", "30s")
        line = cli.fails("failover", "planned", name)
        assert "cannot reverse replication" in line and "upgrade 'host-1' first" in line
        assert "level 2" in line and "level 3" in line
        # Refused before anything happened: the VM runs on, replication goes on.
        assert lab_env.vm(name, "host-1")["state"] == "running"
        assert sync(lab_env, name)["result"] == "ok"
    finally:
        cli("replication", "remove", name, "--host", "host-1", check=False)
        for host in ("host-1", "host-2"):
            cli("vm", "delete", name, "--force", "--host", host, check=False)
        lab_env.restart_agent(1, functional_level=3)


def test_job_cancel_routes_by_kind(lab_env: LabEnv, servers: Path, vm: str) -> None:
    """A planned failover cancelled before it asks the replica; a replication job refuses."""
    cli = lab_env.cli
    sync(lab_env, vm)
    (copy,) = [j for j in cli.json("job", "list", "--host", "host-1")
               if j["vm"] == vm and j["kind"] == "replication-initial"]  # fmt: skip
    line = cli.fails("job", "cancel", copy["id"])
    assert "cannot be cancelled" in line and f"'ferry replication pause {vm}'" in line

    job = cancel_planned_while_it_shuts_down(lab_env, vm)
    assert job["state"] == "cancelled", job
    steps = history(cli, job["id"], "host-1")
    assert steps[-2][0] == "cancelling" and steps[-1] == ("cancelled", "cancelled"), steps
    assert ("running", "starting-on-replica") not in steps  # the replica was never asked
    # The VM runs on host-1 again, host-2 keeps the replica, replication goes on.
    assert lab_env.vm(vm, "host-1")["state"] == "running"
    assert lab_env.vm(vm, "host-2")["state"] == "replica"
    assert cli.json("replication", "status", vm, "--host", "host-1")["role"] == "primary"
    assert sync(lab_env, vm)["result"] == "ok"
    assert "has already ended" in cli.fails("job", "cancel", job["id"])


def cancel_planned_while_it_shuts_down(lab_env: LabEnv, name: str) -> dict[str, Any]:
    """Start a planned failover (not followed), cancel it once it shuts the VM down."""
    from ferry.client.fleet import Fleet
    from ferry.client.settings import load_settings

    async def run() -> dict[str, Any]:
        async with Fleet(load_settings(lab_env.home)) as fleet:
            client = fleet.client("host-1")
            job: dict[str, Any] = await client.post(f"/v1/vms/{name}/failover/planned", {})
            path = f"/v1/jobs/{job['id']}"
            for _ in range(3000):
                if job["phase"] in ("shutting-down", "final-cycle") or job["state"] != "running":
                    break
                await asyncio.sleep(0.02)
                job = await client.get(path)
            assert job["state"] == "running", job
            await client.post(f"{path}/cancel")
            for _ in range(3000):
                job = await client.get(path)
                if job["state"] in ("done", "failed", "cancelled"):
                    return job
                await asyncio.sleep(0.1)
            raise AssertionError(f"the cancelled job never ended: {job}")

    return asyncio.run(run())


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
    assert "still runs on host 'host-1'" in line  # split brain refused

    _kill_host1_and_its_vm(lab_env, vm)
    # host-1 is lost: its files must not be needed (kernel, initrd, disks).
    lost = lab_env.lab.host(1).data_dir / "vms" / lab_env.vm(vm, "host-2")["uuid"]
    hidden = lost.with_name(lost.name + ".lost")
    lost.rename(hidden)
    try:
        started, job_id = followed(cli, "failover", "start", vm)
        assert started["point"] == second and started["host"] == "host-2"
        phases = ("starting", "checking-primary", "creating-overlays", "starting-vm")
        assert history(cli, job_id, "host-2") == walked(*phases)
        uuid = lab_env.vm(vm, "host-2")["uuid"]
        text = lab_env.wait_console(vm, lambda t: UP.search(t) is not None, host="host-2")
        (point_file,) = [f for f in point_files(servers, "host-2", uuid)
                         if f.name.startswith(f"p{second}-")]  # fmt: skip
        assert up_seq(text) == read_records(point_file).last_seq

        cancelled = final(cli, "failover", "cancel", vm)
        assert cancelled["cancelled"] and lab_env.vm(vm, "host-2")["state"] == "replica"
        assert not list((servers / "host-2" / uuid).glob("run-*"))

        # An older point this time, then final.
        started = final(cli, "failover", "start", vm, "--point", str(first))
        assert started["point"] == first
        text = lab_env.wait_console(vm, lambda t: UP.search(t) is not None, host="host-2")
        assert up_seq(text) < read_records(point_file).last_seq
        done = final(cli, "failover", "complete", vm)
        assert done["completed"] and done["point"] == first
        assert "cannot be cancelled" in cli.fails("failover", "cancel", vm)
    finally:
        hidden.rename(lost)
        cli("lab", "up", "--hosts", "2", "--no-guest")
    assert lab_env.vm(vm, "host-1")["state"] in ("crashed", "off")

    reversed_ = final(cli, "replication", "reverse", vm)
    assert reversed_["primary"] == "host-2" and reversed_["replica"] == "host-1"
    status = wait_for(lambda: cli.json("replication", "status", vm, "--host", "host-2"),
                      lambda s: s["state"] == "replicating")  # fmt: skip
    jobs = [j for j in cli.json("job", "list", "--host", "host-2") if j["vm"] == vm
            and j["kind"] == "replication-initial"]  # fmt: skip
    assert jobs[-1]["bytes_sent"] < 8 * 1024**2  # differences only, not the 64 MiB disk
    assert status["latest_point"] is not None
    assert re.search(r"replica", lab_env.vm(vm, "host-1")["state"])


def test_a_failover_cut_short_by_an_agent_crash_can_be_cancelled_or_finished(
    lab_env: LabEnv, servers: Path, vm: str
) -> None:
    """The replica's agent dies in the middle of 'failover start' (test hook)."""
    cli = lab_env.cli
    point, uuid, point_file = fresh_point(lab_env, servers, vm)
    ids = [p["id"] for p in cli.json("replication", "points", vm, "--host", "host-2")]
    on_point = read_records(point_file).last_seq
    cli("vm", "kill", vm, "--host", "host-1")  # the primary's VM is down
    lab_env.restart_agent(2, crash_failover_at="creating-overlays")
    try:
        result = cli("failover", "start", vm, "--host", "host-2", check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert lab_env.lab.host(2).pid() is None  # the agent died in that phase
    finally:
        lab_env.restart_agent(2, crash_failover_at="")

    # The decision was written before the crash; the restart finished the overlays.
    status = cli.json("replication", "status", vm, "--host", "host-2")
    assert status["state"] == "failed-over"
    assert lab_env.vm(vm, "host-2")["state"] == "off"
    (job,) = [j for j in cli.json("job", "list", "--host", "host-2")
              if j["vm"] == vm and j["kind"] == "failover-start"]  # fmt: skip
    assert job["state"] == "failed" and "phase creating-overlays" in job["error"]

    # Cancellable: a replica again, its points untouched.
    cancelled = final(cli, "failover", "cancel", vm, "--host", "host-2")
    assert cancelled["cancelled"] and lab_env.vm(vm, "host-2")["state"] == "replica"
    assert [p["id"] for p in cli.json("replication", "points", vm, "--host", "host-2")] == ids
    assert not list((servers / "host-2" / uuid).glob("run-*"))
    # And a failover then runs through on the same point.
    started = final(cli, "failover", "start", vm, "--host", "host-2")
    assert started["point"] == point
    text = lab_env.wait_console(vm, lambda t: UP.search(t) is not None, host="host-2")
    assert up_seq(text) == on_point
    final(cli, "failover", "cancel", vm, "--host", "host-2")


@pytest.fixture
def host3(lab_env: LabEnv, servers: Path) -> None:
    """A third lab host that accepts replicas from host-2 (a replica forwarding or moving)."""
    lab_env.cli("lab", "up", "--hosts", "3", "--no-guest")
    lab_env.cli("replica-server", "enable", "--host", "host-3", "--storage",
                str(servers / "host-3"), "--allow", "host-2")  # fmt: skip


@pytest.mark.usefixtures("host3")
def test_extended_replication_and_failover_from_the_extended_host(
    lab_env: LabEnv, servers: Path, vm: str
) -> None:
    """host-1 -> host-2 -> host-3: several points travel on as one, failover from host-3."""
    cli = lab_env.cli
    sync(lab_env, vm)
    try:
        # Refusals: not 30s, not to a host that has the VM, not more often than the primary.
        assert "use 5m or 15m" in cli.fails("replication", "extend", vm, "--to", "host-3",
                                            "--frequency", "30s")  # fmt: skip
        assert "extend to a third host" in cli.fails("replication", "extend", vm, "--to", "host-1")
        cli("replication", "set", vm, "--frequency", "15m")
        line = cli.fails("replication", "extend", vm, "--to", "host-3", "--frequency", "5m")
        assert "more often than its primary" in line
        cli("replication", "set", vm, "--frequency", "30s")

        out = cli("replication", "extend", vm, "--to", "host-3", "--frequency", "5m", "--json")
        *events, last = out.stdout.splitlines()
        assert events and json.loads(events[-1])["event"] == "progress"  # the initial copy job
        ext = json.loads(last)
        first = cli.json("replication", "points", vm, "--host", "host-2")[-1]["id"]
        assert ext["state"] == "replicating" and ext["latest_point"] == first
        line = cli.fails("replication", "set", vm, "--frequency", "15m")
        assert "extended from 'host-2' to 'host-3' every 5m" in line
        assert "already extended" in cli.fails("replication", "extend", vm, "--to", "host-3")

        # Three primary cycles; host-2 keeps 1 point + latest, but holds back the
        # merges of what host-3 does not have yet.
        for _ in range(3):
            more_records(lab_env, vm, "host-1")
            sync(lab_env, vm)
        held = [p["id"] for p in cli.json("replication", "points", vm, "--host", "host-2")]
        assert held[-4:] == [first, first + 1, first + 2, first + 3], held
        out = cli.json("replication", "sync", vm, "--host", "host-2")
        assert out["result"] == "ok" and out["point"] == first + 3
        assert out["bytes"] < 8 * 1024**2  # the changes of three points, not the disk
        assert [p["id"] for p in cli.json("replication", "points", vm, "--host", "host-2")] == [
            first + 2, first + 3]  # fmt: skip
        assert [p["id"] for p in cli.json("replication", "points", vm, "--host", "host-3")] == [
            first, first + 3]  # fmt: skip
        on_2 = Path(lab_env.vm(vm, "host-2")["disks"][0]["path"])
        on_3 = Path(lab_env.vm(vm, "host-3")["disks"][0]["path"])
        assert on_3.name.startswith(f"p{first + 3}-")
        assert same_image(on_2, on_3), "the extended replica differs from the replica"
        latest_seq = read_records(on_3).last_seq
        assert latest_seq == read_records(on_2).last_seq and read_records(on_3).corrupt == 0

        status = cli.json("replication", "status", vm, "--host", "host-2")
        assert status["extended"]["host"] == "host-3"
        assert status["extended"]["state"] == "replicating"
        assert status["extended"]["success_count"] == 2
        on_3_status = cli.json("replication", "status", vm, "--host", "host-3")
        assert on_3_status["primary"] == "host-2" and on_3_status["origin"] == "host-1"

        # Failover from the extended host: refused while host-1 runs the VM.
        line = cli.fails("failover", "start", vm, "--host", "host-3")
        assert "still runs on host 'host-1'" in line
        cli("vm", "kill", vm, "--host", "host-1")
        started = final(cli, "failover", "start", vm, "--host", "host-3")
        assert started["point"] == first + 3 and started["host"] == "host-3"
        text = lab_env.wait_console(vm, lambda t: UP.search(t) is not None, host="host-3")
        assert up_seq(text) == latest_seq
        assert "cannot reverse" in cli.fails("replication", "reverse", vm, "--host", "host-3")
        cancelled = final(cli, "failover", "cancel", vm, "--host", "host-3")
        assert cancelled["cancelled"] and lab_env.vm(vm, "host-3")["state"] == "replica"

        removed = cli.json("replication", "extend", vm, "--remove", "--host", "host-2")
        assert removed["removed"] and removed["extended_vm_kept"]
        assert lab_env.vm(vm, "host-3")["state"] == "off"
        assert cli.json("replication", "status", vm, "--host", "host-2")["extended"] is None
    finally:
        cli("replication", "extend", vm, "--remove", "--host", "host-2", check=False)
        cli("vm", "delete", vm, "--force", "--host", "host-3", check=False)


@pytest.mark.usefixtures("host3")
def test_moving_the_replica_ends_its_test_failover_and_keeps_its_points(
    lab_env: LabEnv, servers: Path, vm: str
) -> None:
    """'replication set --replica host-3' moves the replica VM and its chain there."""
    cli = lab_env.cli
    point, uuid, point_file = fresh_point(lab_env, servers, vm)
    on_point = read_records(point_file).last_seq
    final(cli, "failover", "test", vm)
    assert lab_env.vm(f"{vm}-test", "host-2")["state"] == "running"
    ids = [p["id"] for p in cli.json("replication", "points", vm)]
    cli("replication", "pause", vm)  # no cycle between the move and the checks
    try:
        status = cli.json("replication", "set", vm, "--replica", "host-3")
        assert status["replica"] == "host-3" and status["state"] == "paused"
        # The test failover ended with the move; nothing of the VM is left on host-2.
        assert "no VM named" in cli.fails("vm", "show", f"{vm}-test", "--host", "host-2")
        assert "no VM named" in cli.fails("vm", "show", vm, "--host", "host-2")
        assert not (servers / "host-2" / uuid).exists()
        # The points moved with their ids; the latest holds the same records.
        assert [p["id"] for p in cli.json("replication", "points", vm)] == ids
        moved = lab_env.vm(vm, "host-3")
        assert moved["state"] == "replica"
        disk = Path(moved["disks"][0]["path"])
        assert disk.name.startswith(f"p{point}-") and read_records(disk).last_seq == on_point
        on_3 = cli.json("replication", "status", vm, "--host", "host-3")
        assert on_3["primary"] == "host-1"
        # The primary goes on with a plain delta to the new replica host.
        cli("replication", "resume", vm)
        more_records(lab_env, vm, "host-1")
        after = sync(lab_env, vm)
        assert after["point"] > point and after["bytes"] < 8 * 1024**2  # a delta, no new copy
        assert cli.json("replication", "status", vm)["state"] == "replicating"
    finally:
        cli("replication", "remove", vm, "--host", "host-1", check=False)
        cli("vm", "delete", vm, "--force", "--host", "host-3", check=False)
