"""The QEMU guest agent with real QEMU and a real qemu-ga in the test guest.

The guests boot ``--guest test --guest-agent`` with one disk: an ext4 file
system this module makes with ``mke2fs`` (no loop device), which the guest
mounts (``ferry.fs=vda``) and writes ``fN`` files to, each synced and
announced on the console. host-1 replicates to host-2. What is checked:

* ping, freeze and thaw through :class:`ferry.adapters.guest_agent.GuestAgent`
  on the VM's socket, and that a frozen guest's writes really stall;
* the freeze schedule (``--app-consistent-every``): the first cycle freezes,
  the next within the interval does not, ``replication set`` makes the next
  one freeze again; points say ``app_consistent`` only for frozen cuts;
* a frozen point, read on the host without any journal recovery
  (``qemu-img convert`` + ``debugfs``), holds every file the guest synced
  before the freeze, and its ext4 is clean (no ``needs_recovery``, ``e2fsck -n`` 0);
* a failed freeze (qemu-ga not started in the guest) still cuts a
  crash-consistent point and is counted in ``replication measure``;
* the channel survives a live move (the same qemu-ga answers on the
  destination's socket);
* ``vm stop`` of a guest that ignores ACPI shuts it down through the agent,
  and forces off one without an agent answering.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.adapters.guest_agent import GuestAgent
from ferry.host.config import load_host_config
from ferry.host.vms.process import short_name
from tests.conftest import LabEnv

pytestmark = pytest.mark.integration

FS_SIZE = "48M"
SYNCED = re.compile(r"ferry-guest file (\d+) synced")


def needs(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    assert not missing, f"install e2fsprogs / qemu-guest-agent: {missing} missing"


@pytest.fixture(scope="module")
def storage(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("ga-replicas")
    lab_env.cli("replica-server", "enable", "--host", "host-2", "--storage", str(where),
                "--allow", "host-1")  # fmt: skip
    return where


@pytest.fixture(scope="module")
def fs_image(lab_env: LabEnv) -> Path:
    """An empty ext4 file system in a plain file, where vm create --image may read it."""
    needs("mke2fs", "debugfs", "e2fsck", "dumpe2fs", "qemu-ga")
    image = lab_env.lab.images_dir / "ga-fs.raw"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "ferryfs", str(image), FS_SIZE],
                   check=True)  # fmt: skip
    return image


def make_vm(lab_env: LabEnv, name: str, fs_image: Path, *options: str) -> None:
    append = " ".join(("ferry.fs=vda", *options))
    lab_env.cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--guest-agent",
                "--memory", "160M", "--image", str(fs_image), "--append", append,
                "--start")  # fmt: skip


def remove_vm(lab_env: LabEnv, name: str) -> None:
    lab_env.cli("replication", "remove", name, "--host", "host-1", check=False)
    lab_env.cli("vm", "delete", name, "--force", "--host", "host-1", check=False)
    lab_env.cli("vm", "delete", name, "--force", "--host", "host-2", check=False)
    lab_env.cli("vm", "delete", name, "--force", "--host", "host-3", check=False)


def synced(text: str) -> int:
    """The highest file the guest announced as synced."""
    found = [int(n) for n in SYNCED.findall(text)]
    return max(found, default=0)


def wait_synced(lab_env: LabEnv, name: str, at_least: int, timeout: float = 120) -> int:
    text = lab_env.wait_console(name, lambda t: synced(t) >= at_least, timeout=timeout)
    return synced(text)


def agent_socket(lab_env: LabEnv, name: str, host: int = 1) -> Path:
    config = load_host_config(lab_env.lab.host(host).config_path)
    return config.runtime_dir / f"{short_name(lab_env.vm(name, f'host-{host}')['uuid'])}.qga"


def points(lab_env: LabEnv, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = lab_env.cli.json("replication", "points", name)
    return found


def measure(lab_env: LabEnv, name: str) -> dict[str, Any]:
    found: dict[str, Any] = lab_env.cli.json("replication", "measure", name)
    return found


def enable(lab_env: LabEnv, name: str, *args: str) -> None:
    lab_env.cli("replication", "enable", name, "--replica", "host-2", *args, "--json")
    deadline = time.monotonic() + 240
    while not points(lab_env, name):  # the initial copy linked on host-2
        assert time.monotonic() < deadline, "the initial copy never reached the replica"
        time.sleep(1)


def sync(lab_env: LabEnv, name: str) -> dict[str, Any]:
    outcome: dict[str, Any] = lab_env.cli.json("replication", "sync", name)
    assert outcome["result"] == "ok", outcome
    return outcome


def point_files(image: Path, work: Path) -> tuple[dict[int, str], str, int]:
    """The ``fN`` files of a point's file system as the host reads it, without journal
    recovery: {N: content}, the superblock's features, and ``e2fsck -fn``'s exit code."""
    raw = work / f"{image.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(image),
                    str(raw)], check=True)  # fmt: skip
    listing = subprocess.run(["debugfs", "-R", "ls -p /", str(raw)], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    names = [f.split("/")[5] for f in listing.splitlines() if f.count("/") >= 6]
    files: dict[int, str] = {}
    for fname in names:
        if re.fullmatch(r"f\d+", fname):
            out = subprocess.run(["debugfs", "-R", f"cat /{fname}", str(raw)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            files[int(fname[1:])] = out.stdout
    features = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True,
                              text=True).stdout  # fmt: skip
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True).returncode
    raw.unlink()
    return files, features, fsck


@pytest.fixture(scope="module")
def app_vm(lab_env: LabEnv, storage: Path, fs_image: Path) -> Iterator[str]:
    """A guest with qemu-ga writing files to its ext4 disk."""
    name = "ga-app"
    make_vm(lab_env, name, fs_image)
    try:
        lab_env.wait_console(name, lambda t: "ferry-guest agent up" in t, timeout=180)
        wait_synced(lab_env, name, 3)
        yield name
    finally:
        remove_vm(lab_env, name)


def test_vm_show_and_the_socket(lab_env: LabEnv, app_vm: str) -> None:
    vm = lab_env.vm(app_vm)
    assert vm["guest_agent"] is True
    assert agent_socket(lab_env, app_vm).is_socket()


def test_ping_freeze_thaw_and_the_writes_stall_while_frozen(lab_env: LabEnv, app_vm: str) -> None:
    socket = agent_socket(lab_env, app_vm)

    async def frozen_for(seconds: float) -> tuple[int, str, str, int]:
        async with GuestAgent(socket, vm=app_vm) as agent:
            await agent.ping()
            assert await agent.freeze_status() == "thawed"
            count = await agent.freeze()
            state = await agent.freeze_status()
            # lab_env.console runs its own event loop: from a thread.
            before = synced(await asyncio.to_thread(lab_env.console, app_vm))
            await asyncio.sleep(seconds)
            during = synced(await asyncio.to_thread(lab_env.console, app_vm))
            thawed = await agent.thaw()
            assert during - before <= 1, "the guest kept writing files while frozen"
            return count, state, await agent.freeze_status(), thawed

    count, state, after, thawed = asyncio.run(frozen_for(3.0))
    assert count == 1 and state == "frozen"  # the ext4 disk (the initramfs is no block fs)
    assert thawed == 1 and after == "thawed"
    now = synced(lab_env.console(app_vm))
    wait_synced(lab_env, app_vm, now + 3)  # writes go on after the thaw


def test_app_consistent_points_hold_every_synced_file(lab_env: LabEnv, app_vm: str,
                                                      tmp_path: Path) -> None:  # fmt: skip
    name = app_vm
    enable(lab_env, name, "--app-consistent-every", "1h")
    first = points(lab_env, name)
    assert [p["app_consistent"] for p in first] == [True]  # the first cycle froze
    # Within the interval: crash-consistent only.
    wait_synced(lab_env, name, synced(lab_env.console(name)) + 2)
    sync(lab_env, name)
    listed = points(lab_env, name)
    assert [p["app_consistent"] for p in listed] == [True, False]
    assert all(p["consistent"] and p["crash_consistent"] for p in listed)
    # A new interval: the next cycle freezes again (the scheduler, woken by
    # the change, may run it before the sync does: the sync then cuts after it).
    before = synced(lab_env.console(name))  # synced before any later freeze
    assert before >= 3
    lab_env.cli("replication", "set", name, "--app-consistent-every", "1h")
    sync(lab_env, name)
    listed = points(lab_env, name)
    new_points = [p["app_consistent"] for p in listed[2:]]
    assert new_points[0] is True and not any(new_points[1:]), listed
    frozen = listed[2]
    stats = measure(lab_env, name)
    assert stats["app_consistent_count"] == 2 and stats["app_consistent_failure_count"] == 0
    assert stats["app_consistent_every_s"] == 3600
    # Frozen for the transaction only, well inside the watchdog's bound.
    assert 0 < stats["last_freeze_s"] < 10
    print(f"guest frozen for {stats['last_freeze_s']:.3f} s around the cut")
    # The frozen point, read on the host as it lies (no journal replay).
    chain = Path(lab_env.vm(name, "host-2")["disks"][0]["path"]).parent
    files, features, fsck = point_files(chain / f"p{frozen['id']}-disk0.qcow2", tmp_path)
    missing = [n for n in range(1, before + 1) if n not in files]
    assert not missing, f"synced before the freeze but not in the point: {missing[:10]}"
    for n in range(1, before + 1):
        assert files[n] == f"ferry-guest file {n}\n"
    assert "needs_recovery" not in features  # the freeze flushed ext4's journal
    assert fsck == 0
    # The table view says the same.
    table = lab_env.cli("replication", "points", name).stdout
    assert "app" in table and "crash" in table


def test_a_replica_move_keeps_which_points_are_app_consistent(lab_env: LabEnv, app_vm: str,
                                                              tmp_path: Path) -> None:  # fmt: skip
    before = [(p["id"], p["app_consistent"]) for p in points(lab_env, app_vm)]
    assert any(frozen for _, frozen in before) and not all(frozen for _, frozen in before)
    lab_env.cli("lab", "up", "--hosts", "3", "--no-guest")
    lab_env.cli("replica-server", "enable", "--host", "host-3", "--storage",
                str(tmp_path / "replicas3"), "--allow", "host-1", "--allow", "host-2")  # fmt: skip
    lab_env.cli("replication", "set", app_vm, "--replica", "host-3", timeout=400)
    after = [(p["id"], p["app_consistent"]) for p in points(lab_env, app_vm)]
    assert lab_env.cli.json("replication", "status", app_vm)["replica"] == "host-3"
    assert after[: len(before)] == before


def test_a_failed_freeze_cuts_a_crash_consistent_point(lab_env: LabEnv, storage: Path,
                                                       fs_image: Path) -> None:  # fmt: skip
    name = "ga-noagent"
    # The channel is there, qemu-ga is not started; the guest also ignores ACPI.
    make_vm(lab_env, name, fs_image, "ferry.agent=off", "ferry.acpi=off")
    try:
        wait_synced(lab_env, name, 3, timeout=180)
        assert "ferry-guest agent up" not in lab_env.console(name)
        enable(lab_env, name, "--app-consistent-every", "1h")
        listed = points(lab_env, name)
        assert len(listed) == 1
        assert listed[0]["crash_consistent"] and listed[0]["consistent"]
        assert listed[0]["app_consistent"] is False
        stats = measure(lab_env, name)
        assert stats["app_consistent_failure_count"] == 1 and stats["app_consistent_count"] == 0
        assert stats["success_count"] >= 1  # the cycle itself succeeded
        assert "0 points, 1 failed freezes" in lab_env.cli("replication", "measure", name).stdout
        now = synced(lab_env.console(name))
        wait_synced(lab_env, name, now + 2)  # the guest was never left frozen
        # No ACPI, no agent answering: forced off after the timeout.
        lab_env.cli("replication", "remove", name)
        result = lab_env.cli.json("vm", "stop", name, "--host", "host-1", "--timeout", "6s")
        assert result["forced"] is True
    finally:
        remove_vm(lab_env, name)


def test_the_agent_moves_with_the_vm_and_stops_it_when_acpi_is_ignored(
    lab_env: LabEnv, fs_image: Path
) -> None:
    name = "ga-stop"
    make_vm(lab_env, name, fs_image, "ferry.acpi=off")
    try:
        lab_env.wait_console(name, lambda t: "ferry-guest agent up" in t, timeout=180)
        wait_synced(lab_env, name, 2)
        # A live move: the channel comes along, and the same qemu-ga answers there.
        lab_env.cli("vm", "move", name, "--to", "host-2", "--json", timeout=400)
        socket = agent_socket(lab_env, name, host=2)

        async def ping() -> str:
            async with GuestAgent(socket, vm=name) as agent:
                await agent.ping()
                return await agent.freeze_status()

        assert asyncio.run(ping()) == "thawed"
        now = synced(lab_env.console(name, "host-2"))
        lab_env.wait_console(name, lambda t: synced(t) >= now + 2, host="host-2")
        started = time.monotonic()
        result = lab_env.cli.json("vm", "stop", name, "--host", "host-2", "--timeout", "10s")
        assert result["forced"] is False
        assert result["vm"]["state"] == "off"
        assert time.monotonic() - started < 60
        text = lab_env.console(name, "host-2")
        assert "ferry-guest agent shutdown" in text
        assert "ferry-guest powerdown" not in text  # ACPI was ignored
    finally:
        remove_vm(lab_env, name)


def test_bad_input_changes_nothing(lab_env: LabEnv, storage: Path) -> None:
    name = "ga-none"
    lab_env.cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "128M")
    try:
        line = lab_env.cli.fails("replication", "enable", name, "--replica", "host-2",
                                 "--app-consistent-every", "1h")  # fmt: skip
        assert "has no guest agent channel" in line and "--guest-agent" in line
        line = lab_env.cli.fails("replication", "enable", name, "--replica", "host-2",
                                 "--app-consistent-every", "soon")  # fmt: skip
        assert "invalid --app-consistent-every 'soon'" in line
        assert "not replicated" in lab_env.cli.fails("replication", "status", name)
        assert json.loads(lab_env.cli("vm", "show", name, "--json").stdout)["guest_agent"] is False
    finally:
        remove_vm(lab_env, name)
