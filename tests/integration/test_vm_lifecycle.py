"""The VM life cycle for real: lab agents over mutual TLS, QEMU under TCG, the test guest."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from ferry.guest.records import read_records
from ferry.host.config import load_host_config
from tests.conftest import UP, LabEnv, qemu_pids_for, seqs

pytestmark = pytest.mark.integration


def wait_state(env: LabEnv, name: str, state: str, timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    vm = env.vm(name)
    while vm["state"] != state:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} is {vm['state']}, not {state}")
        time.sleep(0.3)
        vm = env.vm(name)
    return vm


def test_hosts_report_their_facts(lab_env: LabEnv) -> None:
    hosts = lab_env.cli.json("host", "list")
    assert [h["name"] for h in hosts] == ["host-1", "host-2"]
    for host in hosts:
        assert set(host) >= {"name", "url", "version", "functional_level", "accelerator", "vms"}
        assert host["accelerator"] == "tcg"
        assert host["url"].startswith("https://127.0.0.1:")
    facts = lab_env.cli.json("host", "show", "host-1")
    assert facts["supported_config_versions"] == [1, facts["functional_level"]]
    status = lab_env.cli.json("lab", "status")
    assert all(h["running"] and h["pid"] for h in status["hosts"])


def test_full_life_cycle_with_the_test_guest(lab_env: LabEnv) -> None:
    cli = lab_env.cli
    cli("vm", "create", "life", "--host", "host-1", "--guest", "test", "--memory", "128M",
        "--disk", "64M")  # fmt: skip
    vm = lab_env.vm("life")
    assert vm["state"] == "off" and vm["host"] == "host-1"
    assert vm["config_version"] == 3 and vm["memory"] == 128 * 1024**2
    assert [d["size"] for d in vm["disks"]] == [64 * 1024**2]
    assert vm["replication"] is None

    cli("vm", "start", "life")
    text = lab_env.wait_console("life", lambda t: len(seqs(t)) >= 2)
    assert UP.findall(text) == ["0"]
    console = cli.json("vm", "console", "life")
    assert console["vm"] == "life" and console["host"] == "host-1"
    assert "ferry-guest up last-seq=0\r\n" in console["text"] and console["offset"] > 0
    first = seqs(text)
    assert first[:2] == [1, 2]
    listed = cli.json("vm", "list")
    assert {"name": "life", "host": "host-1", "state": "running"}.items() <= listed[0].items()
    assert set(listed[0]) >= {"name", "uuid", "host", "state", "config_version"}

    result = cli.json("vm", "stop", "life", "--timeout", "20s")
    assert result["vm"]["state"] == "off"
    assert qemu_pids_for(vm["uuid"]) == []
    disk = Path(vm["disks"][0]["path"])
    scan = read_records(disk)
    assert scan.corrupt == 0
    assert scan.last_seq >= max(first)

    cli("vm", "start", "life")
    text = lab_env.wait_console("life", lambda t: bool(seqs(t)))
    (up,) = UP.findall(text)
    assert int(up) == scan.last_seq  # the guest found every record it wrote
    assert seqs(text)[0] == scan.last_seq + 1
    cli("vm", "kill", "life")
    assert lab_env.vm("life")["state"] == "off"
    assert qemu_pids_for(vm["uuid"]) == []

    records = cli.json("guest", "records", str(disk))
    assert records["corrupt"] == 0 and records["last_seq"] > scan.last_seq

    cli("vm", "delete", "life")
    assert not disk.exists()
    assert "no VM named 'life'" in cli.fails("vm", "show", "life")


def test_agent_killed_and_restarted_while_a_vm_runs(lab_env: LabEnv) -> None:
    cli = lab_env.cli
    cli("vm", "create", "steady", "--host", "host-2", "--guest", "test", "--memory", "128M",
        "--disk", "32M", "--start")  # fmt: skip
    lab_env.wait_console("steady", lambda t: bool(seqs(t)))
    before = lab_env.vm("steady")
    qemu_pid = before["pid"]
    assert qemu_pids_for(before["uuid"]) == [qemu_pid]

    lab_env.kill_agent(2)
    time.sleep(1.0)  # the guest keeps writing while no agent watches
    assert qemu_pids_for(before["uuid"]) == [qemu_pid]
    assert "cannot reach host 'host-2'" in cli.fails("vm", "show", "steady", "--host", "host-2")

    cli("lab", "up", "--hosts", "2", "--no-guest")  # starts only the dead agent
    after = lab_env.vm("steady")
    assert after["state"] == "running"
    assert after["pid"] == qemu_pid
    assert qemu_pids_for(before["uuid"]) == [qemu_pid]  # no second QEMU
    count = len(seqs(cli("vm", "console", "steady").stdout))
    text = lab_env.wait_console("steady", lambda t: len(seqs(t)) > count + 1)
    assert len(UP.findall(text)) == 1  # same boot: the guest never restarted

    # QEMU dies while the agent watches: the VM is crashed, not off.
    os.kill(qemu_pid, signal.SIGKILL)
    wait_state(lab_env, "steady", "crashed")
    # ... and while no agent watches.
    cli("vm", "start", "steady")
    new_pid = lab_env.vm("steady")["pid"]
    lab_env.kill_agent(2)
    os.kill(new_pid, signal.SIGKILL)
    time.sleep(0.5)
    cli("lab", "up", "--hosts", "2", "--no-guest")
    assert lab_env.vm("steady")["state"] == "crashed"
    cli("vm", "start", "steady")
    text = lab_env.wait_console("steady", lambda t: bool(UP.search(t)))
    assert int(UP.findall(text)[0]) > 0
    cli("vm", "delete", "steady", "--force")
    assert qemu_pids_for(before["uuid"]) == []


def test_true_states_after_an_agent_restart(lab_env: LabEnv) -> None:
    """While no agent watches, QEMU is paused behind its back: the restarted agent says so."""
    cli = lab_env.cli
    cli("vm", "create", "sleepy", "--host", "host-1", "--guest", "test", "--memory", "128M",
        "--disk", "16M", "--start")  # fmt: skip
    lab_env.wait_console("sleepy", lambda t: len(seqs(t)) >= 2)
    assert cli.json("vm", "pause", "sleepy")["state"] == "paused"
    assert "cannot pause VM 'sleepy': it is paused" in cli.fails("vm", "pause", "sleepy")
    frozen = seqs(cli("vm", "console", "sleepy").stdout)
    time.sleep(1.0)
    assert seqs(cli("vm", "console", "sleepy").stdout) == frozen  # the guest does not run
    assert cli.json("vm", "resume", "sleepy")["state"] == "running"
    uuid = lab_env.vm("sleepy")["uuid"]

    lab_env.kill_agent(1)
    config = load_host_config(lab_env.lab.host(1).config_path)
    socket_path = config.runtime_dir / f"{uuid.replace('-', '')[:16]}.qmp"

    async def pause_behind_its_back() -> None:
        qmp = QMPClient("test")
        await qmp.connect(str(socket_path))
        await qmp.execute("stop")
        await qmp.disconnect()

    asyncio.run(pause_behind_its_back())
    cli("lab", "up", "--hosts", "2", "--no-guest")
    assert lab_env.vm("sleepy")["state"] == "paused"  # QEMU's truth; the catalog said running

    assert cli.json("vm", "resume", "sleepy")["state"] == "running"
    lab_env.wait_console("sleepy", lambda t: len(seqs(t)) > len(frozen) + 1)
    cli("vm", "delete", "sleepy", "--force")
