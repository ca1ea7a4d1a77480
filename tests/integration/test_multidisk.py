"""One VM with three disks through every data path: moves, export, refresh, replication, failover.

The VM ``md`` has a 64 MiB first disk copied from an image (which already
holds guest records 1..20 and a marker), and two empty disks of 32 and 16 MiB
(each given its own marker while the VM is off). The test guest writes record
``n`` to each disk in turn, so after every operation each disk must:

- hold a valid history: disk 0 every record from 1 (the image's, then the
  guest's), disks 1 and 2 every record from 21 on and nothing older;
- keep its own marker and size (no disk swapped, lost or shrunk);
- agree with the others as one instant (``records.instant_mismatch``): a copy
  of the disks cut at one moment (a recovery point, a live export, a paused
  VM) differs by at most one record, never with an earlier disk behind.

The tests run in order on one lab of three hosts and one VM; each step starts
from the state the step before left (a failed step skips the rest).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ferry.guest.records import (
    DISKS_LINE,
    RECORD_SIZE,
    DiskSetScan,
    encode_record,
    read_disk_set,
    slot_for,
)
from tests.conftest import UP, LabEnv, complete, same_image, seqs

pytestmark = pytest.mark.integration

MIB = 1024**2
SIZES = (64 * MIB, 32 * MIB, 16 * MIB)
IMAGE_SEQ = 20  # records 1..20 are on the first disk's image
MARK_SIZE = 64 * 1024
# Each disk's marker: its last 64 KiB filled with its own byte. The guest's
# records fill a disk from the front at 5 a second; reaching the end of the
# 16 MiB disk would take 13 minutes of guest time.
MARKS = (0x61, 0x62, 0x63)
NAME = "md"
DISKS = len(SIZES)


@dataclass
class Story:
    """What the steps share: the lab, the replica storage, the folders made."""

    env: LabEnv
    storage: Path
    folders: dict[str, Path] = field(default_factory=dict)
    failed: str | None = None


def qemu_io(path: Path, command: str, *, read_only: bool) -> bool:
    argv = ["qemu-io", "-f", "qcow2", *(["-r", "-U"] if read_only else []), "-c", command,
            str(path)]  # fmt: skip
    return subprocess.run(argv, capture_output=True).returncode == 0


def marked(path: Path, index: int) -> bool:
    """Disk ``index``'s marker is where it belongs (backing chains followed)."""
    offset = SIZES[index] - MARK_SIZE
    return qemu_io(path, f"read -P {MARKS[index]} {offset} {MARK_SIZE}", read_only=True)


def virtual_size(path: Path) -> int:
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                          capture_output=True, check=True, text=True).stdout  # fmt: skip
    size: int = json.loads(info)["virtual-size"]
    return size


def check_disks(paths: list[Path]) -> DiskSetScan:
    """Each disk has its own content and all hold one instant of the guest."""
    assert len(paths) == DISKS, paths
    found = read_disk_set(paths)
    assert found.verdict == "ok", f"{found.reason}: {found.to_json()}"
    first, *others = found.scans
    assert first.count == first.last_seq, found.to_json()  # 1..N, the image's and the guest's
    for scan in others:  # 21..N: only this guest's records, none missing
        assert scan.count == scan.last_seq - IMAGE_SEQ, found.to_json()
    for index, path in enumerate(paths):
        assert virtual_size(path) == SIZES[index], path
        assert marked(path, index), f"disk {index} ({path}) lost its marker"
    return found


def api(env: LabEnv, host: str | None, path: str, method: str = "GET") -> Any:
    """A call on an agent's API in this process; host None: where VM ``md`` is.

    The checks and the chores between the steps use this: a CLI start-up per
    look costs about a second of CPU that the TCG guests need. The steps
    themselves use the CLI.
    """
    from ferry.client.fleet import Fleet
    from ferry.client.settings import load_settings

    async def call() -> Any:
        async with Fleet(load_settings(env.home)) as fleet:
            where = host or (await fleet.locate(NAME))[0]
            client = fleet.client(where)
            if method == "DELETE":
                return await client.delete(path, force="1")
            return await (client.post(path) if method == "POST" else client.get(path))

    return asyncio.run(call())


def agent(env: LabEnv, name: str, host: str | None, verb: str | None = None) -> dict[str, Any]:
    """``vm show`` (or ``vm pause|resume|start`` with ``verb``), in this process."""
    path = f"/v1/vms/{name}" + (f"/{verb}" if verb else "")
    found: dict[str, Any] = api(env, host, path, "POST" if verb else "GET")
    return found


def status(env: LabEnv, host: str) -> dict[str, Any]:
    """``replication status md --host HOST --json``, in this process."""
    found: dict[str, Any] = api(env, host, f"/v1/vms/{NAME}/replication")
    return found


def point_ids(env: LabEnv, host: str) -> list[int]:
    return [p["id"] for p in api(env, host, f"/v1/vms/{NAME}/replication/points")]


def jobs(env: LabEnv, host: str, kind: str) -> list[dict[str, Any]]:
    """``job list --host HOST`` of VM md and one kind, oldest first."""
    found = [j for j in api(env, host, "/v1/jobs") if j["vm"] == NAME and j["kind"] == kind]
    return sorted(found, key=lambda job: job["created"])


def vm_disks(env: LabEnv, host: str, name: str = NAME) -> list[Path]:
    disks = agent(env, name, host)["disks"]
    assert [d["size"] for d in disks] == list(SIZES)
    return [Path(d["path"]) for d in disks]


def check_paused(env: LabEnv, host: str, name: str = NAME) -> DiskSetScan:
    """Pause the VM (QEMU drains and flushes its disks), check them, resume."""
    assert agent(env, name, host, "pause")["state"] == "paused"
    try:
        return check_disks(vm_disks(env, host, name))
    finally:
        agent(env, name, host, "resume")


def printed(env: LabEnv, host: str, name: str = NAME) -> list[int]:
    return seqs(env.console(name, host))


def keeps_counting(env: LabEnv, host: str, after: int, name: str = NAME) -> str:
    """The same guest run goes on past ``after`` (no new boot); its console."""
    text = env.wait_console(name, lambda t: bool(seqs(t)) and seqs(t)[-1] > after + 1, host=host)
    return text


def more_records(env: LabEnv, host: str, n: int = 2, name: str = NAME) -> None:
    seen = len(printed(env, host, name))
    env.wait_console(name, lambda t: len(seqs(t)) >= seen + n, host=host)


def booted(env: LabEnv, host: str, name: str = NAME) -> tuple[int, str]:
    """Wait for a boot: its ``up last-seq`` and the disks line (``vda=N vdb=M vdc=K``)."""
    text = env.wait_console(name, lambda t: UP.search(t) is not None, host=host)
    lines = complete(text).splitlines()
    found = [m.group(1).strip() for ln in lines if (m := DISKS_LINE.match(ln))]
    assert found, f"no disks line on {name}'s console:\n{text[-500:]}"
    return int(UP.findall(text)[-1]), found[-1]


def guest_view(found: DiskSetScan) -> str:
    """The disks line a guest booting from these disks prints."""
    return " ".join(f"vd{'abc'[i]}={scan.last_seq}" for i, scan in enumerate(found.scans))


def assert_boots_from(env: LabEnv, host: str, found: DiskSetScan, name: str = NAME) -> None:
    """A guest started on these disks sees each as it is, continues from the newest."""
    up, disks = booted(env, host, name)
    assert disks == guest_view(found)
    assert up == found.last_seq
    text = env.wait_console(name, lambda t: len(seqs(t)) >= 2, host=host)
    assert seqs(text)[0] == found.last_seq + 1


def final(env: LabEnv, *args: str) -> Any:
    """A job-following command's result: the last of its JSON lines."""
    return json.loads(env.cli(*args, "--json").stdout.splitlines()[-1])


def sync(env: LabEnv, host: str) -> dict[str, Any]:
    outcome: dict[str, Any] = env.cli.json("replication", "sync", NAME, "--host", host)
    assert outcome["result"] == "ok", outcome
    return outcome


def point_files(storage: Path, replica: str, uuid: str, point: int | None) -> list[Path]:
    stem = "base" if point is None else f"p{point}"
    files = [storage / replica / uuid / f"{stem}-disk{i}.qcow2" for i in range(DISKS)]
    assert all(f.is_file() for f in files), files
    return files


def fresh_point(story: Story, primary: str, replica: str) -> tuple[int, DiskSetScan]:
    """New records, a cycle: the point's id and its disks, checked as one instant."""
    env = story.env
    more_records(env, primary)
    point: int = sync(env, primary)["point"]
    uuid = agent(env, NAME, primary)["uuid"]
    return point, check_disks(point_files(story.storage, replica, uuid, point))


def replica_equals_primary(env: LabEnv, primary: str, replica: str) -> DiskSetScan:
    """Pause, replicate, compare every disk byte for byte, resume."""
    assert agent(env, NAME, primary, "pause")["state"] == "paused"
    try:
        sync(env, primary)
        ours, theirs = vm_disks(env, primary), vm_disks(env, replica)
        for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert same_image(a, b), f"disk {index} of the replica differs from the primary's"
        found = check_disks(theirs)
        assert found.scans == check_disks(ours).scans
        return found
    finally:
        agent(env, NAME, primary, "resume")


def wait_for(get: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if done(value):
            return value
        assert time.monotonic() < deadline, value
        time.sleep(0.5)


def first_image(path: Path) -> None:
    """A 64 MiB qcow2 with records 1..20 where the guest writes them, and disk 0's marker."""
    raw = path.with_suffix(".raw")
    slots = SIZES[0] // RECORD_SIZE
    with raw.open("wb") as f:
        f.truncate(SIZES[0])
        for seq in range(1, IMAGE_SEQ + 1):
            f.seek(slot_for(seq, slots) * RECORD_SIZE)
            f.write(encode_record(seq))
        f.seek(SIZES[0] - MARK_SIZE)
        f.write(bytes([MARKS[0]]) * MARK_SIZE)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(path)], check=True)  # fmt: skip
    raw.unlink()


@pytest.fixture(scope="module")
def story(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    """Three hosts that accept replication from each other, and ``md`` running on host-1.

    The lab (with every VM and QEMU in it) is torn down and checked by lab_env.
    """
    env = lab_env
    env.cli("lab", "up", "--hosts", "3", "--no-guest")
    storage = tmp_path_factory.mktemp("replicas")
    for me, allowed in (("host-1", "host-2"), ("host-2", "host-1"), ("host-3", "host-2")):
        env.cli("replica-server", "enable", "--host", me, "--storage", str(storage / me),
                "--allow", allowed)  # fmt: skip
    image = env.lab.images_dir / "md-disk0.qcow2"
    first_image(image)
    # The image first, then the two empty disks, on the volume every host sees.
    env.cli("vm", "create", NAME, "--host", "host-1", "--guest", "test", "--memory", "128M",
            "--volume", "shared", "--image", str(image), "--disk", "32M",
            "--disk", "16M")  # fmt: skip
    image.unlink()
    paths = vm_disks(env, "host-1")
    for index in (1, 2):
        offset = SIZES[index] - MARK_SIZE
        assert qemu_io(paths[index], f"write -P {MARKS[index]} {offset} {MARK_SIZE}",
                       read_only=False)  # fmt: skip
    env.cli("vm", "start", NAME)
    up, disks = booted(env, "host-1")
    assert (up, disks) == (IMAGE_SEQ, f"vda={IMAGE_SEQ} vdb=0 vdc=0")
    env.wait_console(NAME, lambda t: len(seqs(t)) >= 2)
    yield Story(env=env, storage=storage)


@pytest.fixture(autouse=True)
def in_order(story: Story, request: pytest.FixtureRequest) -> Iterator[None]:
    """Each step needs the state the previous one left: after a failure, skip the rest."""
    if story.failed:
        pytest.skip(f"an earlier step failed: {story.failed}")
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        story.failed = request.node.name


def test_the_guest_writes_every_disk(story: Story) -> None:
    found = check_paused(story.env, "host-1")
    # Every disk got the guest's records: disks 1 and 2 from record 21 on.
    assert all(scan.last_seq > IMAGE_SEQ for scan in found.scans)


def test_live_moves_with_shared_and_copied_disks_there_and_back(story: Story) -> None:
    env = story.env
    shared = vm_disks(env, "host-1")
    steps = (("host-2", "shared"), ("host-1", "shared"), ("host-2", "copy"), ("host-1", "copy"))
    for dest, storage in steps:
        source = agent(env, NAME, None)["host"]
        before = printed(env, source)[-1]
        result = final(env, "vm", "move", NAME, "--to", dest, "--storage", storage)
        assert result["result"] == "ok" and result["host"] == dest, result
        assert result["storage"] == storage
        text = keeps_counting(env, dest, before)
        assert not UP.search(text), "the guest rebooted"  # the same run, moved
        assert seqs(text)[0] > before
        paths = vm_disks(env, dest)
        if storage == "shared":
            assert paths == shared  # the same files
        else:
            assert all(p.is_relative_to(env.lab.host(int(dest[-1])).data_dir) for p in paths)
        found = check_paused(env, dest)
        assert found.last_seq >= seqs(text)[-1]


def test_refresh_vms_keeps_every_disk(story: Story) -> None:
    env = story.env
    before = agent(env, NAME, "host-1")
    last = printed(env, "host-1")[-1]
    report = env.cli.json("host", "refresh-vms", "host-1")
    (result,) = [r for r in report["results"] if r["vm"] == NAME]
    assert result["old_pid"] == before["pid"] and result["pid"] != before["pid"]
    text = keeps_counting(env, "host-1", last)
    assert text.count("ferry-guest up") <= 1  # the same boot
    check_paused(env, "host-1")


def test_live_export_holds_every_disk_at_one_instant(story: Story) -> None:
    env = story.env
    folder = env.lab.images_dir / "md-live"
    env.cli("vm", "export", NAME, "--to", str(folder), "--live")
    assert agent(env, NAME, None)["state"] == "running"
    assert sorted(p.name for p in folder.glob("disk*.qcow2")) == [
        f"disk{i}.qcow2" for i in range(DISKS)
    ]
    check_disks([folder / f"disk{i}.qcow2" for i in range(DISKS)])
    story.folders["live"] = folder


def test_offline_export_and_import_in_each_mode(story: Story) -> None:
    env = story.env
    env.cli("vm", "stop", NAME, "--timeout", "30s")
    stopped = check_disks(vm_disks(env, "host-1"))
    folder = env.lab.images_dir / "md-off"
    env.cli("vm", "export", NAME, "--to", str(folder))
    exported = [folder / f"disk{i}.qcow2" for i in range(DISKS)]
    assert check_disks(exported).scans == stopped.scans
    for ours, theirs in zip(vm_disks(env, "host-1"), exported, strict=True):
        assert same_image(ours, theirs)
    register = env.lab.images_dir / "md-register"
    shutil.copytree(folder, register)

    live = story.folders["live"]
    imports = (  # (VM, host, folder, mode): three guests at once, the original is off
        ("md-copy", "host-2", folder, "copy"),
        ("md-reg", "host-3", register, "register"),
        ("md-twin", "host-1", live, "new-id"),  # host-1 has md's UUID already
    )
    before: dict[str, DiskSetScan] = {}
    for name, host, source, mode in imports:
        env.cli("vm", "import", str(source), "--host", host, "--mode", mode, "--name", name)
        imported = agent(env, name, host)
        assert (imported["uuid"] == agent(env, NAME, None)["uuid"]) == (mode != "new-id")
        if mode == "register":
            assert [Path(d["path"]).parent for d in imported["disks"]] == [register] * DISKS
        # Read before the start: a registered guest runs on these very files, and
        # a stop cut after vda finishes its round on vdc as the guest boots.
        before[name] = check_disks([source / f"disk{i}.qcow2" for i in range(DISKS)])
        agent(env, name, host, "start")
    for name, host, _, _ in imports:
        assert_boots_from(env, host, before[name], name)
        check_paused(env, host, name)
        api(env, host, f"/v1/vms/{name}", "DELETE")

    env.cli("vm", "start", NAME)
    assert_boots_from(env, "host-1", stopped)


def test_replication_initial_copy_cycles_and_pending_points(story: Story) -> None:
    env = story.env
    enabled = final(env, "replication", "enable", NAME, "--replica", "host-2", "--frequency",
                   "30s", "--recovery-points", "2")  # fmt: skip
    assert enabled["state"] == "replicating", enabled
    uuid = agent(env, NAME, None)["uuid"]
    first = point_ids(env, "host-1")[0]
    # The initial copy is a point in time of the running VM: all disks at one instant.
    base = check_disks(point_files(story.storage, "host-2", uuid, None))
    assert first == 0 and base.last_seq > IMAGE_SEQ

    last = base
    for _ in range(3):
        point, found = fresh_point(story, "host-1", "host-2")
        assert found.last_seq > last.last_seq
        last = found
    assert agent(env, NAME, "host-2")["disks"][0]["path"].endswith(f"p{point}-disk0.qcow2")

    # A damaged stream: the point stays pending on the primary, then goes again.
    env.restart_agent(1, corrupt_replication_streams=1)
    try:
        more_records(env, "host-1")
        line = env.cli.fails("replication", "sync", NAME)
        assert "damaged" in line or "checksum" in line, line
        held = status(env, "host-1")
        assert held["pending_points"] == 1 and held["state"] == "replicating"
        outcome = sync(env, "host-1")
        assert outcome["point"] == point + 2  # the pending point went, then a new one
        assert point_ids(env, "host-1")[-2:] == [point + 1, point + 2]
        check_disks(point_files(story.storage, "host-2", uuid, point + 1))
        check_disks(point_files(story.storage, "host-2", uuid, point + 2))
    finally:
        env.restart_agent(1, corrupt_replication_streams=0)
    replica_equals_primary(env, "host-1", "host-2")


def test_a_killed_qemu_resynchronises_every_disk(story: Story) -> None:
    env = story.env
    env.cli("vm", "kill", NAME)  # the bitmaps come back inconsistent
    crashed = check_disks(vm_disks(env, "host-1"))
    env.cli("vm", "start", NAME)
    assert_boots_from(env, "host-1", crashed)
    more_records(env, "host-1")
    outcome = sync(env, "host-1")
    assert outcome["bytes"] < 8 * MIB  # differing blocks, not the 112 MiB of disks
    resync = jobs(env, "host-1", "replication-resync")
    assert resync and resync[-1]["state"] == "done"
    uuid = agent(env, NAME, None)["uuid"]
    check_disks(point_files(story.storage, "host-2", uuid, outcome["point"]))
    replica_equals_primary(env, "host-1", "host-2")
    more_records(env, "host-1")
    assert sync(env, "host-1")["bytes"] < MIB  # and plain deltas again


def test_test_failover_boots_every_disk_of_a_point(story: Story) -> None:
    env = story.env
    point, found = fresh_point(story, "host-1", "host-2")
    started = final(env, "failover", "test", NAME)
    assert started["point"] == point and started["test_vm"] == f"{NAME}-test"
    assert_boots_from(env, "host-2", found, f"{NAME}-test")
    check_paused(env, "host-2", f"{NAME}-test")
    more_records(env, "host-1")
    sync(env, "host-1")  # replication goes on meanwhile
    assert final(env, "failover", "stop-test", NAME)["stopped"]


def test_extended_replication_carries_every_disk(story: Story) -> None:
    env = story.env
    ext = final(env, "replication", "extend", NAME, "--to", "host-3", "--frequency", "5m",
                "--host", "host-2")  # fmt: skip
    assert ext["state"] == "replicating", ext
    try:
        for _ in range(2):
            fresh_point(story, "host-1", "host-2")
        out = env.cli.json("replication", "sync", NAME, "--host", "host-2")
        assert out["result"] == "ok", out
        on_2, on_3 = vm_disks(env, "host-2"), vm_disks(env, "host-3")
        assert on_3[0].name.startswith(f"p{out['point']}-")
        for index, (a, b) in enumerate(zip(on_2, on_3, strict=True)):
            assert same_image(a, b), f"disk {index} on host-3 differs from host-2's"
        assert check_disks(on_3).scans == check_disks(on_2).scans
    finally:
        removed = env.cli.json("replication", "extend", NAME, "--remove", "--host", "host-2")
        env.cli("vm", "delete", NAME, "--force", "--host", "host-3", check=False)
    assert removed["removed"]


def test_planned_failover_and_replication_back(story: Story) -> None:
    env = story.env
    fresh_point(story, "host-1", "host-2")
    result = final(env, "failover", "planned", NAME)
    assert result["host"] == "host-2"
    last_printed = printed(env, "host-1")[-1]  # the old run, up to its shutdown
    up, _ = booted(env, "host-2")
    # Nothing printed is lost; the shutdown may have cut a round after vda.
    assert last_printed <= up <= last_printed + 1
    keeps_counting(env, "host-2", up)
    check_paused(env, "host-2")
    back = wait_for(lambda: status(env, "host-2"), lambda s: s["state"] == "replicating")
    assert back["primary"] == "host-2" and back["replica"] == "host-1"
    initial = jobs(env, "host-2", "replication-initial")
    assert initial and initial[-1]["state"] == "done"
    assert initial[-1]["bytes_sent"] < 8 * MIB  # only differences flowed back
    fresh_point(story, "host-2", "host-1")
    replica_equals_primary(env, "host-2", "host-1")


def test_unplanned_failover_and_reverse(story: Story) -> None:
    env = story.env
    point, found = fresh_point(story, "host-2", "host-1")
    pid = agent(env, NAME, "host-2")["pid"]
    env.kill_agent(2)  # host-2 is lost, with its VM
    os.kill(pid, signal.SIGKILL)
    try:
        started = final(env, "failover", "start", NAME, "--host", "host-1")
        assert started["point"] == point and started["host"] == "host-1"
        assert_boots_from(env, "host-1", found)
        assert final(env, "failover", "complete", NAME, "--host", "host-1")["completed"]
    finally:
        env.cli("lab", "up", "--hosts", "3", "--no-guest")
    assert agent(env, NAME, "host-2")["state"] in ("crashed", "off")

    reversed_ = final(env, "replication", "reverse", NAME, "--host", "host-1")
    assert reversed_["primary"] == "host-1" and reversed_["replica"] == "host-2"
    wait_for(lambda: status(env, "host-1"), lambda s: s["state"] == "replicating")
    initial = jobs(env, "host-1", "replication-initial")
    assert initial and initial[-1]["state"] == "done"
    assert initial[-1]["bytes_sent"] < 8 * MIB  # the old primary's disks were the initial copy
    fresh_point(story, "host-1", "host-2")
    replica_equals_primary(env, "host-1", "host-2")
