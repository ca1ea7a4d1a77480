"""Disk full on the replica's storage and on a move's destination: a clean failure, then success.

The test mounts a tmpfs with ``size=`` (as root; unmounted however the test
ends) as host-2's replica storage, then (in the other test) one over
host-2's VM directory, the place a move's destination creates the copied
disks (and where ``replication remove`` turns a replica into a VM, which is
why the two are never mounted at once). The guest's disk holds
16 MiB of random data, more than either tmpfs. Each run asserts the
operation fails with one clear error line, leaves nothing half-written
registered (no replica VM or point on host-2, no entry of the moved VM,
no file left in the tmpfs), the VM still runs on host-1 and its records are
all there; then the tmpfs is grown (``mount -o remount,size=``) and the same
operation succeeds.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ferry.guest.records import read_records
from tests.conftest import LabEnv
from tests.faults.conftest import LONG_TIMEOUT, Tally, api, printed_seq, running_on, runs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
]

VM = "dfull"
SMALL, LARGE = "4m", "256m"


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(where)], check=True)  # fmt: skip


def resize(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``where`` for the block's life (unmounted even on failure)."""
    mount_tmpfs(where, size)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def guest(lab_env: LabEnv) -> Iterator[str]:
    image = lab_env.lab.images_dir / f"{VM}.qcow2"
    raw = image.with_suffix(".raw")
    raw.write_bytes(os.urandom(16 * 1024**2))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(image)], check=True)  # fmt: skip
    raw.unlink()
    lab_env.cli("vm", "create", VM, "--host", "host-1", "--guest", "test", "--memory", "128M",
                "--image", str(image), "--start")  # fmt: skip
    lab_env.wait_console(VM, lambda t: t.count("seq ") >= 2, timeout=240)
    yield VM
    lab_env.cli("replication", "remove", VM, "--host", "host-1", check=False)
    for host in ("host-1", "host-2"):
        lab_env.cli("vm", "delete", VM, "--force", "--host", host, check=False)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def files_in(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def entries_on_host2(lab_env: LabEnv) -> list[str]:
    return [v["state"] for v in api(lab_env, "host-2", "GET", "/v1/vms") if v["name"] == VM]


def records_kept(lab_env: LabEnv, tally: Tally) -> None:
    """Pause, compare the disk's newest record with the newest the guest printed, resume."""
    (host,) = running_on(lab_env, VM)
    durable = printed_seq(lab_env, VM)
    lab_env.cli("vm", "pause", VM, "--host", host)
    try:
        found = read_records(Path(lab_env.vm(VM, host)["disks"][0]["path"]))
        tally.lost_records += max(0, durable - found.last_seq)
        assert found.last_seq >= durable and found.corrupt == 0
    finally:
        lab_env.cli("vm", "resume", VM, "--host", host)


@LONG_TIMEOUT
def test_replica_storage_full(lab_env: LabEnv, guest: str, tally: Tally,
                              tmp_path: Path) -> None:  # fmt: skip
    with tmpfs(tmp_path / "replicas", SMALL) as storage:
        replica_storage_full(lab_env, tally, storage)


def replica_storage_full(lab_env: LabEnv, tally: Tally, storage: Path) -> None:
    lab_env.cli("replica-server", "enable", "--host", "host-2", "--storage", str(storage),
                "--allow", "host-1")  # fmt: skip
    for _ in range(runs(1)):
        result = lab_env.cli("replication", "enable", VM, "--replica", "host-2", "--frequency",
                             "5m", check=False)  # fmt: skip
        line = one_error_line(result)
        tally.ran("replica-storage-full")
        assert f"replica storage {storage} on host 'host-2' is full" in line, line
        assert "MiB free" in line and "--storage" in line and "Errno" not in line, line
        left = files_in(storage)
        tally.half_written_left += len(left)
        assert left == [], left  # nothing half-written (no kernel.partial, no point file)
        # Nor a replica VM registered on host-2, nor a relationship on host-1.
        assert entries_on_host2(lab_env) == [], line
        status = lab_env.cli("replication", "status", VM, "--host", "host-1", check=False)
        assert status.returncode != 0, status.stdout
        records_kept(lab_env, tally)
    resize(storage, LARGE)
    lab_env.cli("replication", "enable", VM, "--replica", "host-2", "--frequency", "5m")
    out = lab_env.cli("replication", "sync", VM, "--json").stdout.strip().splitlines()[-1]
    assert json.loads(out)["result"] == "ok"
    assert entries_on_host2(lab_env) == ["replica"]
    lab_env.cli("replication", "remove", VM, "--host", "host-1")
    lab_env.cli("vm", "delete", VM, "--force", "--host", "host-2")
    assert entries_on_host2(lab_env) == []


@LONG_TIMEOUT
def test_move_destination_full(lab_env: LabEnv, guest: str, tally: Tally) -> None:
    assert entries_on_host2(lab_env) == []  # host-2 holds no VM: its VM dir can be replaced
    with tmpfs(lab_env.lab.host_named("host-2").data_dir / "vms", SMALL) as vms:
        move_destination_full(lab_env, tally, vms)


def move_destination_full(lab_env: LabEnv, tally: Tally, vms: Path) -> None:
    for _ in range(runs(1)):
        result = lab_env.cli("vm", "move", VM, "--to", "host-2", check=False)
        line = one_error_line(result)
        tally.ran("move-destination-full")
        assert "space" in line.lower(), line
        assert running_on(lab_env, VM) == ["host-1"]
        assert entries_on_host2(lab_env) == []
        assert files_in(vms) == [], files_in(vms)
        records_kept(lab_env, tally)
    resize(vms, LARGE)
    out = lab_env.cli("vm", "move", VM, "--to", "host-2", "--json").stdout
    assert json.loads(out.strip().splitlines()[-1])["result"] == "ok"
    assert running_on(lab_env, VM) == ["host-2"]
    out = lab_env.cli("vm", "move", VM, "--to", "host-1", "--json").stdout
    assert json.loads(out.strip().splitlines()[-1])["result"] == "ok"
    assert files_in(vms) == []
