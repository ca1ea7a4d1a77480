"""SIGKILL during a replication cycle, a live export and an import, looped.

One test guest on host-1, replicated to host-2. Each run starts the
operation as its own ``ferry`` process, kills the victim by pid after a
delay that walks through the operation (so runs land in different phases:
the offer, the backup transaction, the stream, the link; the copy, the
manifest), then recovers as an admin would (``lab up``, ``vm start`` for a
killed QEMU) and checks: every job ends or is cancelled, the operation
completes when retried, no ``*.partial`` is left on the replica, its chain
passes ``qemu-img check``, its records have no corrupt block and never go
backwards, an export folder cut short is refused by import (or complete),
an import cut short leaves either nothing or a whole VM, and at the end the
replica equals the primary's disk (guest paused).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.guest.records import read_records
from tests.conftest import LabEnv, same_image
from tests.faults.conftest import (
    FULL,
    LONG_TIMEOUT,
    Tally,
    api,
    boot_writing_guest,
    check_chain,
    jobs_of,
    lab_up,
    printed_seq,
    running_on,
    runs,
    settle_jobs,
)
from tests.faults.test_kill_move import qemu_pid_on

pytestmark = pytest.mark.integration

VM = "kops"
CYCLE_VICTIMS = ["primary-agent", "replica-agent", "primary-qemu"]
DELAYS = [0.1, 0.4, 0.8, 1.5]  # seconds after the command started


@pytest.fixture(scope="module")
def storage(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("replicas")
    lab_env.cli("replica-server", "enable", "--host", "host-2", "--storage", str(where),
                "--allow", "host-1")  # fmt: skip
    return where


@pytest.fixture(scope="module")
def guest(lab_env: LabEnv, storage: Path) -> Iterator[str]:
    cli = lab_env.cli
    boot_writing_guest(lab_env, VM)
    cli("replication", "enable", VM, "--replica", "host-2", "--frequency", "5m")
    yield VM
    cli("replication", "remove", VM, "--host", "host-1", check=False)
    for host in ("host-1", "host-2"):
        cli("vm", "delete", VM, "--force", "--host", host, check=False)


def start(env: LabEnv, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ferry", *args], text=True,
                            env=dict(os.environ, FERRY_HOME=str(env.home)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)  # fmt: skip


def finish(proc: subprocess.Popen[str], timeout: float = 20) -> int | None:
    """The command's exit code, or None once this test ended it (its agent died)."""
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    return proc.returncode


def kill_host_agent(env: LabEnv, host: str) -> None:
    pid = env.lab.host_named(host).pid()
    if pid is not None:
        os.kill(pid, signal.SIGKILL)


def restart_guest(env: LabEnv) -> None:
    """After a QEMU kill: the guest runs again on host-1."""
    deadline = time.monotonic() + 60
    while running_on(env, VM) != ["host-1"]:
        state = env.vm(VM, "host-1")["state"]
        if state in ("crashed", "off"):
            env.cli("vm", "start", VM, "--host", "host-1")
        assert time.monotonic() < deadline, f"{VM} never ran again (state {state})"
        time.sleep(0.5)
    env.wait_console(VM, lambda t: t.count("seq ") >= 1)


def sync_until_ok(env: LabEnv, tally: Tally, what: str) -> None:
    deadline = time.monotonic() + 90
    while True:
        out = env.cli("replication", "sync", VM, "--json", check=False).stdout.strip()
        if out and json.loads(out.splitlines()[-1]).get("result") == "ok":
            return
        if time.monotonic() > deadline:
            tally.stuck_operations += 1
            tally.notes.append(f"{what}: no cycle succeeded within 90 s")
            return
        time.sleep(1)


def replica_checked(env: LabEnv, storage: Path, uuid: str, tally: Tally, seq: int) -> int:
    assert not list((storage / uuid).glob("*.partial")), "a half-written point was left"
    check_chain(sorted((storage / uuid).glob("*.qcow2")), tally)
    found = read_records(Path(env.vm(VM, "host-2")["disks"][0]["path"]))
    assert found.corrupt == 0 and found.last_seq >= seq, (found, seq)
    return found.last_seq


@LONG_TIMEOUT
def test_kill_during_replication_cycles(lab_env: LabEnv, storage: Path, guest: str,
                                        tally: Tally) -> None:  # fmt: skip
    uuid = lab_env.vm(VM)["uuid"]
    seq = replica_checked(lab_env, storage, uuid, tally, 0)
    # Short form: both agents; long form: N runs of each victim.
    victims = [v for _ in range(runs(1)) for v in CYCLE_VICTIMS] if FULL else CYCLE_VICTIMS[:2]
    for i, victim in enumerate(victims):
        delay = DELAYS[i % len(DELAYS)]
        time.sleep(0.5)  # a few more records, so the delta is never empty
        proc = start(lab_env, "replication", "sync", VM, "--json")
        time.sleep(delay)
        if victim == "primary-qemu":
            pid = qemu_pid_on(lab_env, "host-1", uuid)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        else:
            kill_host_agent(lab_env, "host-1" if victim == "primary-agent" else "host-2")
        finish(proc)
        tally.ran(f"cycle-{victim}")
        lab_up(lab_env)
        if victim == "primary-qemu":
            restart_guest(lab_env)
        settle_jobs(lab_env, uuid, tally)
        sync_until_ok(lab_env, tally, f"cycle-{victim}")
        seq = replica_checked(lab_env, storage, uuid, tally, seq)
    lab_env.cli("vm", "pause", VM, "--host", "host-1")
    try:
        sync_until_ok(lab_env, tally, "final")
        primary = Path(lab_env.vm(VM, "host-1")["disks"][0]["path"])
        replica = Path(lab_env.vm(VM, "host-2")["disks"][0]["path"])
        ours, theirs = read_records(replica), read_records(primary)
        tally.lost_records += max(0, theirs.last_seq - ours.last_seq)
        assert same_image(primary, replica)
    finally:
        lab_env.cli("vm", "resume", VM, "--host", "host-1")
    assert tally.stuck_operations == 0 and tally.bad_chains == 0, tally.notes


@LONG_TIMEOUT
def test_kill_during_export_and_import(lab_env: LabEnv, guest: str, tally: Tally) -> None:
    uuid = lab_env.vm(VM)["uuid"]
    tmp_path = lab_env.lab.images_dir  # export folders must be in the hosts' image dirs
    for i in range(runs(1)):
        delay = DELAYS[i % len(DELAYS)]
        folder = tmp_path / f"export{i}"
        durable = printed_seq(lab_env, VM)
        proc = start(lab_env, "vm", "export", VM, "--to", str(folder), "--live")
        time.sleep(delay)
        kill_host_agent(lab_env, "host-1")
        code = finish(proc)
        tally.ran("export-agent")
        lab_up(lab_env)
        settle_jobs(lab_env, uuid, tally)
        if code != 0 and folder.exists():
            name = f"half{i}"
            exports = sorted((j for j in jobs_of(lab_env, uuid) if j["kind"] == "export"),
                             key=lambda j: str(j.get("created", "")))  # fmt: skip
            if exports and exports[-1]["state"] == "done":
                # The export ended before the kill, only its reply was lost: the
                # folder is whole, and import takes it.
                tally.notes.append(f"export {i}: done before the kill; its folder imports")
                lab_env.cli("vm", "import", str(folder), "--host", "host-2", "--mode",
                            "new-id", "--name", name)  # fmt: skip
                lab_env.cli("vm", "delete", name, "--force", "--host", "host-2")
            else:  # cut short: import must refuse it, in one line
                lab_env.cli.fails("vm", "import", str(folder), "--host", "host-2", "--mode",
                                  "new-id", "--name", name)  # fmt: skip
            assert not [v for v in api(lab_env, "host-2", "GET", "/v1/vms") if v["name"] == name]
        whole = tmp_path / f"whole{i}"
        lab_env.cli("vm", "export", VM, "--to", str(whole), "--live")  # a retry completes

        # The import of the whole folder, killed, then retried.
        name = f"imp{i}"
        proc = start(lab_env, "vm", "import", str(whole), "--host", "host-2", "--mode",
                     "new-id", "--name", name)  # fmt: skip
        time.sleep(delay)
        kill_host_agent(lab_env, "host-2")
        finish(proc)
        tally.ran("import-agent")
        lab_up(lab_env)
        found = [v for v in api(lab_env, "host-2", "GET", "/v1/vms") if v["name"] == name]
        if found:
            settle_jobs(lab_env, found[0]["uuid"], tally)
        if not found:
            lab_env.cli("vm", "import", str(whole), "--host", "host-2", "--mode", "new-id",
                        "--name", name)  # fmt: skip
        shown = lab_env.vm(name, "host-2")
        assert shown["state"] == "off", shown["state"]
        imported = read_records(Path(shown["disks"][0]["path"]))
        tally.lost_records += max(0, durable - imported.last_seq)
        assert imported.corrupt == 0 and imported.last_seq >= durable
        lab_env.cli("vm", "delete", name, "--force", "--host", "host-2")
    assert tally.stuck_operations == 0, tally.notes
