"""Live migration for real: two lab agents, QEMU over TLS, the test guest writing records."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.guest.records import read_records
from ferry.host.config import load_host_config
from tests.conftest import UP, LabEnv, qemu_pids_for, seqs

pytestmark = pytest.mark.integration


def boot(env: LabEnv, name: str, host: str, *extra: str) -> dict[str, Any]:
    env.cli("vm", "create", name, "--host", host, "--guest", "test", "--memory", "128M",
            "--disk", "32M", "--start", *extra)  # fmt: skip
    env.wait_console(name, lambda t: len(seqs(t)) >= 2)
    return env.vm(name)


def data_dir(env: LabEnv, index: int) -> Path:
    return load_host_config(env.lab.host(index).config_path).data_dir


def assert_clean(env: LabEnv, index: int, uuid: str) -> None:
    """Host ``index`` keeps no trace of the VM: no catalog entry, no dir, no QEMU."""
    host = f"host-{index}"
    names = [vm["uuid"] for vm in env.cli.json("vm", "list", "--host", host)]
    assert uuid not in names
    assert not (data_dir(env, index) / "vms" / uuid).exists()


# The one writer of VM states logs each change (ferry.host.vms.states).
STATE_CHANGE = re.compile(r"state (\S+) -> (\S+) by (\S+) \(vm ([0-9a-f-]+)\)")


def state_changes(env: LabEnv, index: int, uuid: str) -> list[tuple[str, str, str]]:
    """Every state change host ``index`` recorded for VM ``uuid``: (from, to, by)."""
    text = env.lab.host(index).log_path.read_text(errors="replace")
    return [(m[1], m[2], m[3]) for m in STATE_CHANGE.finditer(text) if m[4] == uuid]


BOOTED = [("off", "starting", "start"), ("starting", "running", "started")]


# Every phase of a move that copies its disks, in order (core.migration.NEXT).
COPY_MOVE = ["queued", "preparing", "copying-disks", "copying-memory", "switching-over", "done"]


def move_phases(env: LabEnv, name: str, host: str = "host-1") -> list[str]:
    """The phases the VM's last move on ``host`` went through, in order (``job show``)."""
    moves = [j for j in env.cli.json("job", "list", "--host", host)
             if j["vm"] == name and j["kind"] == "move"]  # fmt: skip
    job = env.cli.json("job", "show", moves[-1]["id"], "--host", host)
    return list(job["phase_started"])


def finish_on(env: LabEnv, name: str, host: str) -> Any:
    """Kill the VM where it runs and read its disk: every record there, none corrupt."""
    vm = env.vm(name)
    assert vm["host"] == host and vm["state"] == "running"
    env.cli("vm", "kill", name)
    scan = read_records(Path(vm["disks"][0]["path"]))
    assert scan.corrupt == 0
    assert scan.count == scan.last_seq  # records 1..N all on the disk, none missing
    return scan


def test_shared_storage_move_keeps_the_guest_counting(lab_env: LabEnv) -> None:
    vm = boot(lab_env, "roamer", "host-1", "--volume", "shared")
    before = seqs(lab_env.console("roamer"))
    result = json.loads(lab_env.cli("vm", "move", "roamer", "--to", "host-2", "--json")
                        .stdout.strip().splitlines()[-1])  # fmt: skip
    assert result["result"] == "ok" and result["host"] == "host-2"
    assert result["storage"] == "shared"
    assert move_phases(lab_env, "roamer") == [p for p in COPY_MOVE if p != "copying-disks"]
    assert result["total_s"] > 0 and result["downtime_ms"] >= 0
    moved = lab_env.vm("roamer")
    assert moved["uuid"] == vm["uuid"] and moved["config_version"] == vm["config_version"]
    assert moved["disks"][0]["path"] == vm["disks"][0]["path"]  # the same file, not a copy
    assert_clean(lab_env, 1, vm["uuid"])
    assert qemu_pids_for(vm["uuid"]) == [moved["pid"]]
    # The source went running -> migrating and then forgot the VM (assert_clean);
    # the destination took it in as migrating and resumed it.
    assert state_changes(lab_env, 1, vm["uuid"]) == [*BOOTED, ("running", "migrating", "migrate")]
    assert state_changes(lab_env, 2, vm["uuid"]) == [("migrating", "running", "arrived")]

    text = lab_env.wait_console("roamer", lambda t: len(seqs(t)) >= 3)
    assert not UP.search(text)  # no reboot: the same guest run
    assert seqs(text)[0] > max(before)
    # and back, shared explicitly
    lab_env.cli("vm", "move", "roamer", "--to", "host-1", "--storage", "shared")
    assert lab_env.vm("roamer")["host"] == "host-1"
    text = lab_env.wait_console("roamer", lambda t: len(seqs(t)) >= 2)
    assert not UP.search(text)
    scan = finish_on(lab_env, "roamer", "host-1")
    assert scan.last_seq >= max(seqs(text))
    lab_env.cli("vm", "delete", "roamer")


def test_shared_nothing_move_there_and_back(lab_env: LabEnv) -> None:
    vm = boot(lab_env, "nomad", "host-1")
    last_on_source = max(seqs(lab_env.console("nomad")))
    lab_env.cli("vm", "move", "nomad", "--to", "host-2")
    there = lab_env.vm("nomad")
    assert there["host"] == "host-2" and there["uuid"] == vm["uuid"]
    assert Path(there["disks"][0]["path"]).is_relative_to(data_dir(lab_env, 2))
    assert not Path(vm["disks"][0]["path"]).exists()  # the source copy is gone
    assert move_phases(lab_env, "nomad") == COPY_MOVE
    assert_clean(lab_env, 1, vm["uuid"])
    text = lab_env.wait_console("nomad", lambda t: len(seqs(t)) >= 2)
    assert not UP.search(text) and seqs(text)[0] > last_on_source

    lab_env.cli("vm", "move", "nomad", "--to", "host-1", "--storage", "copy")
    back = lab_env.vm("nomad")
    assert back["host"] == "host-1"
    assert_clean(lab_env, 2, vm["uuid"])
    text = lab_env.wait_console("nomad", lambda t: len(seqs(t)) >= 2)
    assert not UP.search(text)
    scan = finish_on(lab_env, "nomad", "host-1")
    assert scan.last_seq >= max(seqs(text))
    lab_env.cli("vm", "delete", "nomad")


def _data_bytes(image: Path) -> int:
    """Bytes of ``image`` held as data (allocated and not zero clusters)."""
    argv = ["qemu-img", "map", "-U", "--output=json", str(image)]
    extents = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
    return sum(e["length"] for e in extents if e["data"] and not e["zero"])


def _pattern_holds(image: Path, pattern: int, offset: str, length: str) -> bool:
    """qemu-io reads ``length`` at ``offset`` of ``image`` and checks every byte is ``pattern``."""
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-U", "-c",
                          f"read -P {pattern} {offset} {length}", str(image)],
                         capture_output=True, text=True)  # fmt: skip
    return out.returncode == 0 and "verification failed" not in out.stdout + out.stderr


def test_guest_writes_during_the_disk_copy_all_arrive(lab_env: LabEnv) -> None:
    """A copy move whose disk phase lasts seconds while the guest writes a record every 200 ms.

    The disk holds 96 MiB of data at 64 MiB (the guest's records fill it from
    the front); the move's cap stretches the mirror over several seconds.
    On the destination every record up to the last one the guest printed on
    the source is there, none torn, the data is byte for byte the source's,
    the rest still reads as zeroes, and only the data crossed as data.
    """
    image = lab_env.lab.images_dir / "writer.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "256M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 64M 96M", str(image)], check=True,
                   capture_output=True)  # fmt: skip
    lab_env.cli("vm", "create", "writer", "--host", "host-1", "--guest", "test", "--memory",
                "128M", "--image", str(image), "--start")  # fmt: skip
    lab_env.wait_console("writer", lambda t: len(seqs(t)) >= 2)
    moved = lab_env.cli("vm", "move", "writer", "--to", "host-2", "--storage", "copy",
                        "--max-bandwidth", "24M", "--json")  # fmt: skip
    result = json.loads(moved.stdout.strip().splitlines()[-1])
    assert result["result"] == "ok" and result["storage"] == "copy"
    assert result["disk_copy_s"] >= 2  # about 4 s at 24 MiB/s: 10 or more records meanwhile
    printed = max(seqs(lab_env.wait_console("writer", lambda t: len(seqs(t)) >= 2)))
    vm = lab_env.vm("writer")
    disk = Path(vm["disks"][0]["path"])
    assert vm["host"] == "host-2" and disk.is_relative_to(data_dir(lab_env, 2))
    scan = finish_on(lab_env, "writer", "host-2")  # no record lost, none torn
    assert scan.last_seq >= printed
    assert _pattern_holds(disk, 0x5A, "64M", "96M")
    assert _pattern_holds(disk, 0, "160M", "96M")
    # Zeroes and unallocated clusters did not arrive as data: the data, the records, no more.
    records = scan.count * 4096
    assert _data_bytes(disk) <= 96 * 1024**2 + records + 2 * 1024**2
    lab_env.cli("vm", "delete", "writer")
    image.unlink()


def test_shared_storage_is_refused_when_the_destination_cannot_see_the_disks(
    lab_env: LabEnv,
) -> None:
    vm = boot(lab_env, "local", "host-1")
    line = lab_env.cli.fails("vm", "move", "local", "--to", "host-2", "--storage", "shared")
    assert "host 'host-2' cannot see the disks of VM 'local'" in line
    assert lab_env.vm("local")["state"] == "running"
    assert qemu_pids_for(vm["uuid"]) == [vm["pid"]]
    assert_clean(lab_env, 2, vm["uuid"])
    assert "already runs on host 'host-1'" in lab_env.cli.fails(
        "vm", "move", "local", "--to", "host-1"
    )
    lab_env.cli("vm", "delete", "local", "--force")


# -- failures mid-copy ---------------------------------------------------------


class SlowMove:
    """A move throttled to a crawl, running in the background."""

    def __init__(self, env: LabEnv, name: str) -> None:
        self.env = env
        self.name = name
        self.before: dict[str, Any] = {}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ferry", "vm", "move", name, "--to", "host-2",
             "--max-bandwidth", "4M", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, FERRY_HOME=str(env.home)), stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def wait_phase(self, phase: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = [j for j in self.env.cli.json("job", "list", "--host", "host-1")
                    if j["vm"] == self.name and j["kind"] == "move"]  # fmt: skip
            if jobs and jobs[-1]["phase"] == phase and jobs[-1]["progress"].get("ram_bytes"):
                return jobs[-1]
            time.sleep(0.3)
        raise AssertionError(f"the move of {self.name} never reached {phase}")

    def result(self, timeout: float = 90) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def slow_move(lab_env: LabEnv) -> Iterator[SlowMove]:
    before = boot(lab_env, "victim", "host-1")
    move = SlowMove(lab_env, "victim")
    move.before = before
    yield move
    move.close()
    lab_env.cli("vm", "delete", "victim", "--force", check=False)


def assert_still_on_source(env: LabEnv, before: dict[str, Any]) -> None:
    after = env.vm("victim")
    assert after["host"] == "host-1" and after["state"] == "running"
    assert after["pid"] == before["pid"]  # the same QEMU: the VM never left
    count = len(seqs(env.console("victim")))
    text = env.wait_console("victim", lambda t: len(seqs(t)) > count + 1)
    assert len(UP.findall(text)) == 1


def test_cancel_mid_copy_leaves_the_vm_where_it_was(lab_env: LabEnv, slow_move: SlowMove) -> None:
    before = slow_move.before
    job = slow_move.wait_phase("copying-memory")
    lab_env.cli("job", "cancel", job["id"])
    code, err = slow_move.result()
    assert code != 0 and "cancelled" in err
    assert lab_env.cli.json("job", "show", job["id"])["state"] == "cancelled"
    assert_still_on_source(lab_env, before)
    assert_clean(lab_env, 2, before["uuid"])
    assert qemu_pids_for(before["uuid"]) == [before["pid"]]
    assert state_changes(lab_env, 1, before["uuid"]) == [
        *BOOTED,
        ("running", "migrating", "migrate"),
        ("migrating", "running", "migrate-aborted"),
    ]
    assert state_changes(lab_env, 2, before["uuid"]) == []  # it never arrived


def test_destination_qemu_killed_mid_copy(lab_env: LabEnv, slow_move: SlowMove) -> None:
    before = slow_move.before
    slow_move.wait_phase("copying-memory")
    (dest_pid,) = [p for p in qemu_pids_for(before["uuid"]) if p != before["pid"]]
    os.kill(dest_pid, signal.SIGKILL)
    code, err = slow_move.result()
    assert code != 0 and "failed" in err
    assert_still_on_source(lab_env, before)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (data_dir(lab_env, 2) / "vms" / before["uuid"]).exists():
        time.sleep(0.2)
    assert_clean(lab_env, 2, before["uuid"])
    assert qemu_pids_for(before["uuid"]) == [before["pid"]]


def test_destination_agent_killed_mid_copy(lab_env: LabEnv, slow_move: SlowMove) -> None:
    before = slow_move.before
    slow_move.wait_phase("copying-memory")
    lab_env.kill_agent(2)
    code, err = slow_move.result()
    assert code != 0 and "stopped answering" in err
    assert_still_on_source(lab_env, before)
    lab_env.cli("lab", "up", "--hosts", "2", "--no-guest")  # the destination comes back
    assert_clean(lab_env, 2, before["uuid"])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(qemu_pids_for(before["uuid"])) > 1:
        time.sleep(0.2)
    assert qemu_pids_for(before["uuid"]) == [before["pid"]]


def test_source_agent_restarted_mid_copy(lab_env: LabEnv, slow_move: SlowMove) -> None:
    before = slow_move.before
    slow_move.wait_phase("copying-memory")
    lab_env.kill_agent(1)
    slow_move.result()  # the CLI loses its agent; it reports and exits
    lab_env.cli("lab", "up", "--hosts", "2", "--no-guest")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(qemu_pids_for(before["uuid"])) != 1:
        time.sleep(0.2)
    assert qemu_pids_for(before["uuid"]) == [before["pid"]]  # exactly one running copy
    assert_still_on_source(lab_env, before)
    assert_clean(lab_env, 2, before["uuid"])
    job = [j for j in lab_env.cli.json("job", "list", "--host", "host-1") if j["vm"] == "victim"]
    assert job[-1]["state"] == "failed" and "restarted" in job[-1]["error"]
