"""Replication through the CLI and real agents: host-1 is the primary, host-2 the replica.

Every check that matters compares bytes: the replica's latest recovery point
against the primary's disk while the guest is paused (``qemu-img compare``),
and the guest's own records on every point (a prefix of the primary's, no
corrupt record).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.guest.records import read_records
from tests.conftest import LabEnv, same_image

pytestmark = pytest.mark.integration

ZERO_TP = "0" * 64


@pytest.fixture(scope="module")
def storage(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """host-2 accepts replication from host-1 into a fresh dir."""
    where = tmp_path_factory.mktemp("replicas")
    lab_env.cli("replica-server", "enable", "--host", "host-2", "--storage", str(where),
                "--allow", "host-1")  # fmt: skip
    return where


@pytest.fixture
def vm(lab_env: LabEnv, storage: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A running test guest on host-1, removed with its replication afterwards."""
    name = request.node.name.removeprefix("test_").replace("_", "-")[:30].rstrip("-")
    lab_env.cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "128M",
                "--disk", "64M", "--start")  # fmt: skip
    lab_env.wait_console(name, lambda t: t.count("seq ") >= 2)
    yield name
    cleanup(lab_env, name)


def cleanup(lab_env: LabEnv, name: str) -> None:
    lab_env.cli("replication", "remove", name, "--host", "host-1", check=False)
    lab_env.cli("vm", "delete", name, "--force", "--host", "host-1", check=False)
    lab_env.cli("vm", "delete", name, "--force", "--host", "host-2", check=False)


def enable(lab_env: LabEnv, name: str, *args: str) -> dict[str, Any]:
    """``replication enable --json``: progress event lines, then the status."""
    out = lab_env.cli("replication", "enable", name, "--replica", "host-2", *args, "--json")
    final: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return final


def records_written(lab_env: LabEnv, name: str, more: int, host: str = "host-1") -> None:
    """Wait until the guest wrote ``more`` further records."""
    seen = lab_env.console(name, host).count("seq ")
    lab_env.wait_console(name, lambda t: t.count("seq ") >= seen + more, host=host)


def sync(lab_env: LabEnv, name: str) -> dict[str, Any]:
    outcome: dict[str, Any] = lab_env.cli.json("replication", "sync", name)
    assert outcome["result"] == "ok", outcome
    return outcome


def replica_disk(lab_env: LabEnv, name: str) -> Path:
    return Path(lab_env.vm(name, "host-2")["disks"][0]["path"])


def assert_replica_equals_primary(lab_env: LabEnv, name: str, host: str = "host-1") -> int:
    """Pause the guest, replicate, compare byte for byte, resume; the records' last seq."""
    lab_env.cli("vm", "pause", name, "--host", host)
    try:
        sync(lab_env, name)
        disks = zip(lab_env.vm(name, host)["disks"], lab_env.vm(name, "host-2")["disks"],
                    strict=True)  # fmt: skip
        for ours_disk, theirs_disk in disks:
            assert same_image(Path(ours_disk["path"]), Path(theirs_disk["path"])), (
                "the replica's latest point differs from the disk"
            )
        primary = Path(lab_env.vm(name, host)["disks"][0]["path"])
        replica = replica_disk(lab_env, name)
        ours, theirs = read_records(replica), read_records(primary)
        assert ours.corrupt == 0 and ours.count == ours.last_seq == theirs.last_seq
        return ours.last_seq
    finally:
        lab_env.cli("vm", "resume", name, "--host", host)


def wait_status(lab_env: LabEnv, name: str, done: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = lab_env.cli.json("replication", "status", name)
        if done(status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.3)


def chain_files(storage: Path, uuid: str) -> list[Path]:
    return sorted((storage / uuid).glob("*.qcow2"))


def test_cycles_keep_a_chain_equal_to_the_disk(lab_env: LabEnv, storage: Path) -> None:
    cli = lab_env.cli
    vm = "chain"
    # Two disks: every recovery point holds a delta of each, cut at one instant.
    cli("vm", "create", vm, "--host", "host-1", "--guest", "test", "--memory", "128M",
        "--disk", "64M", "--disk", "32M", "--start")  # fmt: skip
    lab_env.wait_console(vm, lambda t: t.count("seq ") >= 2)
    try:
        cycles_keep_a_chain(lab_env, storage, vm)
    finally:
        cleanup(lab_env, vm)


def cycles_keep_a_chain(lab_env: LabEnv, storage: Path, vm: str) -> None:
    cli = lab_env.cli
    status = enable(lab_env, vm, "--frequency", "30s", "--recovery-points", "2")
    assert status["state"] == "replicating" and status["health"] == "normal"
    assert len(status["thumbprint"]) == 64  # the replica's certificate is pinned
    assert lab_env.vm(vm, "host-2")["state"] == "replica"
    line = cli.fails("vm", "start", vm, "--host", "host-2")
    assert "replica" in line

    # Both agents restart; from here on the scheduler must also cut points by
    # itself (every 30 s), counted apart from the cycles this test asks for.
    lab_env.restart_agent(2)
    lab_env.restart_agent(1)
    restarted = cli.json("replication", "status", vm)["success_count"]
    manual = 0

    # A clean stop keeps the bitmap in the qcow2: after a start, plain deltas go on.
    cli("vm", "stop", vm)
    assert cli.json("replication", "sync", vm)["result"] == "skipped"  # off: nothing changes
    cli("vm", "start", vm)
    lab_env.wait_console(vm, lambda t: "up last-seq=" in t)

    # Replication resumed by itself after the restarts: the scheduler's own cycle
    # (due 30 s after the enable's) comes before any asked for, as each of those
    # would put the next scheduled one 30 s later.
    wait_status(lab_env, vm, lambda s: s["success_count"] > restarted, timeout=60)

    for _ in range(5):
        records_written(lab_env, vm, 2)
        outcome = sync(lab_env, vm)
        manual += 1
        assert 0 < outcome["bytes"] < 1024**2  # a few changed clusters, not the disk
    assert not [j for j in cli.json("job", "list", "--host", "host-1")
                if j["vm"] == vm and j["kind"] == "replication-resync"]  # fmt: skip

    points = cli.json("replication", "points", vm)
    ids = [p["id"] for p in points]
    # 2 kept + the latest, consecutive (scheduled cycles may have cut some of them)
    assert len(ids) == 3 and ids == list(range(ids[0], ids[0] + 3))
    assert ids[-1] >= outcome["point"] >= 5
    assert [p["time"] for p in points] == sorted(p["time"] for p in points)
    # Retention merged the older points into the base; every remaining point reads
    # as a valid disk whose records grow from point to point.
    uuid = lab_env.vm(vm)["uuid"]
    files = chain_files(storage, uuid)
    assert [f.name for f in files] == sorted(
        f"{stem}-disk{i}.qcow2" for stem in ("base", f"p{ids[1]}", f"p{ids[2]}") for i in (0, 1)
    )
    for f in files:
        subprocess.run(["qemu-img", "check", "-q", str(f)], check=True)
    files = [f for f in files if "disk0" in f.name]  # the disk the guest writes
    last = [read_records(f) for f in files]
    assert all(r.corrupt == 0 and r.count == r.last_seq for r in last)
    assert last[0].last_seq <= last[1].last_seq <= last[2].last_seq

    last_seq = assert_replica_equals_primary(lab_env, vm)
    manual += 1
    assert last_seq >= last[2].last_seq

    status = cli.json("replication", "measure", vm)
    assert status["failure_count"] == 0
    assert status["lag_s"] is not None and status["lag_s"] < 60
    assert status["average_delta_bytes"] > 0 and status["max_delta_bytes"] >= status[
        "average_delta_bytes"]  # fmt: skip
    on_replica = cli.json("replication", "status", vm, "--host", "host-2")
    assert on_replica["role"] == "replica" and on_replica["primary"] == "host-1"
    shown = lab_env.vm(vm)["replication"]
    assert shown["role"] == "primary" and shown["replica"] == "host-2"
    assert "run 'ferry replication remove chain' first" in cli.fails("vm", "delete", vm)
    assert "replication remove" in cli.fails("vm", "delete", vm, "--host", "host-2")

    # More successes than asked for: the scheduler's cycle counted with the rest.
    assert cli.json("replication", "status", vm)["success_count"] > restarted + manual


def test_a_damaged_stream_is_refused_and_resent(lab_env: LabEnv, storage: Path, vm: str) -> None:
    cli = lab_env.cli
    cli("replication", "enable", vm, "--replica", "host-2", "--frequency", "30s")
    lab_env.restart_agent(1, corrupt_replication_streams=1)
    try:
        records_written(lab_env, vm, 2)
        line = cli.fails("replication", "sync", vm)
        assert "failed" in line and ("damaged" in line or "checksum" in line), line
        uuid = lab_env.vm(vm)["uuid"]
        assert not list((storage / uuid).glob("*.partial"))  # nothing half-linked
        status = cli.json("replication", "status", vm)
        assert status["failure_count"] == 1 and status["pending_points"] == 1
        assert status["state"] == "replicating"  # a retry can cure it
        outcome = sync(lab_env, vm)
        # The same point went again, then the next one.
        assert outcome["point"] == 2 and status["latest_point"] == 0
        assert [p["id"] for p in cli.json("replication", "points", vm)] == [0, 1, 2]
        assert_replica_equals_primary(lab_env, vm)
    finally:
        lab_env.restart_agent(1, corrupt_replication_streams=0)


def test_pause_resume_and_a_pinned_certificate(lab_env: LabEnv, vm: str) -> None:
    cli = lab_env.cli
    cli("replication", "enable", vm, "--replica", "host-2", "--frequency", "30s")
    paused = cli.json("replication", "pause", vm)
    assert paused["state"] == "paused" and paused["health"] == "warning"
    assert "resume it first" in cli.fails("replication", "sync", vm)
    assert cli.json("replication", "resume", vm)["state"] == "replicating"
    sync(lab_env, vm)

    real = cli.json("replication", "status", vm)["thumbprint"]
    cli("replication", "set", vm, "--certificate-thumbprint", ZERO_TP)  # starts a cycle
    status = wait_status(lab_env, vm, lambda s: s["state"] == "error")
    assert status["health"] == "critical" and status["failure_count"] >= 1
    assert f"presented certificate thumbprint {real}" in status["error"]
    assert ZERO_TP in status["error"] and f"--certificate-thumbprint {real}" in status["error"]
    # Error is sticky: the scheduler does not retry until an admin acts.
    assert "resume it first" in cli.fails("replication", "sync", vm)
    fixed = cli.json("replication", "set", vm, "--certificate-thumbprint", real)
    assert fixed["state"] == "replicating" and fixed["error"] is None
    sync(lab_env, vm)
    assert_replica_equals_primary(lab_env, vm)


def test_refusals(lab_env: LabEnv, storage: Path, vm: str) -> None:
    cli = lab_env.cli
    cli("replica-server", "enable", "--host", "host-2", "--storage", str(storage),
        "--allow", "host-9")  # fmt: skip
    try:
        line = cli.fails("replication", "enable", vm, "--replica", "host-2")
        assert "does not accept replication from 'host-1'" in line
    finally:
        cli("replica-server", "enable", "--host", "host-2", "--storage", str(storage),
            "--allow", "host-1")  # fmt: skip
    assert "not replicated" in cli.fails("replication", "status", vm)
    assert "30s, 5m or 15m" in cli.fails("replication", "enable", vm, "--replica", "host-2",
                                         "--frequency", "10s")  # fmt: skip
    assert "0..24" in cli.fails("replication", "enable", vm, "--replica", "host-2",
                                "--recovery-points", "25")  # fmt: skip
    assert lab_env.cli.json("vm", "list", "--host", "host-2") == []  # nothing half-made

    cli("replication", "enable", vm, "--replica", "host-2", "--frequency", "30s")
    lab_env.restart_agent(2, functional_level=2)
    try:
        cli.fails("replication", "sync", vm)  # (or a scheduled cycle got there first)
        status = cli.json("replication", "status", vm)
        assert status["state"] == "error"
        assert "functional level 2, older than primary host 'host-1' at level 3" in status["error"]
        # A new relationship is refused up front, naming both levels.
        cli("replication", "remove", vm)
        cli("vm", "delete", vm, "--host", "host-2")  # the kept replica VM
        line = cli.fails("replication", "enable", vm, "--replica", "host-2")
        assert "upgrade 'host-2' first" in line and "level 2" in line
    finally:
        lab_env.restart_agent(2, functional_level=3)
    enable(lab_env, vm, "--frequency", "30s")
    sync(lab_env, vm)


def test_a_killed_qemu_resynchronises(lab_env: LabEnv, vm: str) -> None:
    cli = lab_env.cli
    cli("replication", "enable", vm, "--replica", "host-2", "--frequency", "30s")
    records_written(lab_env, vm, 2)
    sync(lab_env, vm)
    cli("vm", "kill", vm)  # the persistent bitmap comes back inconsistent
    cli("vm", "start", vm)
    lab_env.wait_console(vm, lambda t: "up last-seq=" in t)
    records_written(lab_env, vm, 2)
    outcome = sync(lab_env, vm)
    # Only the blocks that differ travel: far less than the 64 MiB disk.
    assert outcome["bytes"] < 8 * 1024**2
    jobs = [j for j in cli.json("job", "list", "--host", "host-1")
            if j["vm"] == vm and j["kind"] == "replication-resync"]  # fmt: skip
    assert jobs and jobs[-1]["state"] == "done"
    assert cli.json("replication", "status", vm)["state"] == "replicating"
    assert_replica_equals_primary(lab_env, vm)
    records_written(lab_env, vm, 1)
    assert sync(lab_env, vm)["bytes"] < 1024**2  # and plain deltas again


def test_an_initial_copy_scheduled_for_later(lab_env: LabEnv, vm: str) -> None:
    cli = lab_env.cli
    status = enable(lab_env, vm, "--initial-at", "1h")
    assert status["state"] == "initial-copy"
    outcome = cli.json("replication", "sync", vm)
    assert outcome["result"] == "skipped" and "later" in outcome["reason"]
    assert cli.json("replication", "points", vm) == []
    assert "in the past" in cli.fails("replication", "enable", vm, "--replica", "host-2",
                                      "--initial-at", "2020-01-01T00:00")  # fmt: skip


def test_initial_copy_from_media(lab_env: LabEnv, vm: str, tmp_path: Path) -> None:
    cli = lab_env.cli
    media = tmp_path / "carry"
    status = enable(lab_env, vm, "--initial", f"media:{media}")
    assert status["state"] == "initial-copy"
    assert (media / "ferry-initial-copy.json").is_file()
    assert cli.json("replication", "sync", vm)["result"] == "skipped"
    (media / "base-disk0.qcow2").with_name("evil").write_text("x")
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(media), str(damaged)], check=True)
    with (damaged / "base-disk0.qcow2").open("r+b") as handle:
        handle.seek(70000)
        handle.write(b"\xff")
    line = cli.fails("replication", "import-initial", str(damaged), "--host", "host-2")
    assert "does not match its checksum" in line
    imported = cli.json("replication", "import-initial", str(media), "--host", "host-2")
    assert imported["point"] == 0
    records_written(lab_env, vm, 2)
    outcome = sync(lab_env, vm)
    assert outcome["bytes"] < 1024**2
    assert cli.json("replication", "status", vm)["state"] == "replicating"
    last_seq = assert_replica_equals_primary(lab_env, vm)

    # Removing replication leaves the replica as a plain off VM on its latest point.
    uuid = lab_env.vm(vm)["uuid"]
    removed = cli.json("replication", "remove", vm)
    assert removed["removed"] and removed["replica_vm_kept"]
    kept = lab_env.vm(vm, "host-2")
    assert kept["state"] == "off" and kept["replication"] is None
    disk = Path(kept["disks"][0]["path"])
    argv = ["qemu-img", "info", "--output=json", str(disk)]
    info = json.loads(subprocess.run(argv, capture_output=True, check=True, text=True).stdout)
    assert "backing-filename" not in info
    assert read_records(disk).last_seq >= last_seq
    chain_dir = disk.parent
    assert sorted(p.name for p in chain_dir.iterdir()) == ["disk0.qcow2"]  # chain gone
    assert lab_env.vm(vm, "host-1")["replication"] is None
    cli("vm", "delete", vm, "--host", "host-2")
    assert not chain_dir.exists() and uuid not in str(list(chain_dir.parent.iterdir()))


def test_initial_copy_from_an_existing_vm(lab_env: LabEnv, vm: str, tmp_path: Path) -> None:
    cli = lab_env.cli
    folder = lab_env.lab.images_dir / f"{vm}-export"
    cli("vm", "export", vm, "--to", str(folder), "--live")
    cli("vm", "import", str(folder), "--host", "host-2", "--mode", "copy")
    records_written(lab_env, vm, 3)  # the copy is now behind the primary
    status = enable(lab_env, vm, "--initial", "existing", "--host", "host-1")
    assert status["initial"] == "existing"
    outcome = sync(lab_env, vm)
    assert outcome["bytes"] < 4 * 1024**2  # a few differing 1 MiB blocks, not the disk
    assert cli.json("replication", "status", vm)["state"] == "replicating"
    assert_replica_equals_primary(lab_env, vm)


def test_replication_follows_a_moved_vm(lab_env: LabEnv, vm: str) -> None:
    """A live move of the primary hands the relationship over; no new full copy."""
    cli = lab_env.cli
    cli("lab", "up", "--hosts", "3", "--no-guest")
    enable(lab_env, vm, "--frequency", "30s")
    records_written(lab_env, vm, 2)
    before = sync(lab_env, vm)["point"]
    out = cli("vm", "move", vm, "--to", "host-3", "--storage", "copy", "--json").stdout
    moved = json.loads(out.splitlines()[-1])
    assert moved["host"] == "host-3"
    try:
        status = cli.json("replication", "status", vm)
        assert status["primary"] == "host-3" and status["state"] == "replicating"
        assert "no VM named" in cli.fails("replication", "status", vm, "--host", "host-1")
        records_written(lab_env, vm, 2, host="host-3")
        outcome = sync(lab_env, vm)
        # The bitmap moved with the VM: a small delta, the next point, no resync.
        assert outcome["point"] > before and outcome["bytes"] < 1024**2
        ids = [p["id"] for p in cli.json("replication", "points", vm)]
        assert ids == list(range(ids[0], outcome["point"] + 1))  # no gap, no new base
        assert not [j for j in cli.json("job", "list", "--host", "host-3")
                    if j["vm"] == vm and j["kind"].startswith("replication")]  # fmt: skip
        on_replica = cli.json("replication", "status", vm, "--host", "host-2")
        assert on_replica["primary"] == "host-3"
        assert_replica_equals_primary(lab_env, vm, host="host-3")
    finally:
        cli("replication", "remove", vm, "--host", "host-3", check=False)
        cli("vm", "delete", vm, "--force", "--host", "host-3", check=False)


def _random_image(path: Path, size_mib: int) -> None:
    raw = path.with_suffix(".raw")
    with raw.open("wb") as handle:
        handle.write(os.urandom(size_mib * 1024**2))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(path)], check=True)  # fmt: skip
    raw.unlink()


def _wait_for_progress(lab_env: LabEnv, name: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = lab_env.cli.json("job", "list", "--host", "host-1")
        mine = [j for j in jobs if j["vm"] == name and j["kind"] == "replication-initial"]
        if mine and (mine[-1].get("progress") or {}).get("bytes", 0) > 2 * 1024**2:
            return
        time.sleep(0.2)
    raise AssertionError("the initial copy never made progress")


@pytest.mark.parametrize("victim", [1, 2])
def test_an_agent_killed_mid_copy(lab_env: LabEnv, storage: Path, victim: int) -> None:
    """Kill the primary's or the replica's agent while a point streams; nothing is lost."""
    cli = lab_env.cli
    name = f"bulk{victim}"
    image = lab_env.lab.images_dir / f"{name}.qcow2"
    _random_image(image, 16)
    lab_env.restart_agent(1, replication_max_bandwidth="4M")  # so the copy takes seconds
    try:
        cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "128M",
            "--image", str(image), "--start")  # fmt: skip
        lab_env.wait_console(name, lambda t: t.count("seq ") >= 2)
        env = dict(os.environ, FERRY_HOME=str(lab_env.home))
        enable = subprocess.Popen(
            [sys.executable, "-m", "ferry", "replication", "enable", name, "--replica",
             "host-2", "--frequency", "30s", "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_for_progress(lab_env, name)
            lab_env.kill_agent(victim)
        finally:
            enable.communicate(timeout=60)
        cli("lab", "up", "--hosts", "2", "--no-guest")  # starts the killed agent again
        uuid = lab_env.vm(name)["uuid"]
        deadline = time.monotonic() + 120
        while True:  # the relationship resumes by itself; a sync makes it now
            outcome = json.loads(cli("replication", "sync", name, "--json", check=False).stdout
                                 or "{}")  # fmt: skip
            if outcome.get("result") == "ok":
                break
            assert time.monotonic() < deadline, outcome
            time.sleep(1)
        assert not list((storage / uuid).glob("*.partial"))
        assert cli.json("replication", "status", name)["state"] == "replicating"
        assert_replica_equals_primary(lab_env, name)
    finally:
        lab_env.restart_agent(1, replication_max_bandwidth=0)
        cleanup(lab_env, name)
