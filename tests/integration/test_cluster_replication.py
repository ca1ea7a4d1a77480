"""What already works keeps working for clustered VMs: replication, export, import, console.

A lab of four hosts: cluster ``c1`` of host-1..3 (real etcd, volume ``csv1``,
lease TTL 4 s) and host-4, a standalone replica server. A clustered test
guest on host-1 replicates to host-4 and moves live to host-3 (the old
handover); host-3's agent and the guest's QEMU are SIGKILLed; the cluster
restarts the guest on another node, whose next cycles land on host-4 after a
resynchronisation by block hashes. Checked
with bytes: the replica's latest point equals the disk on the cluster volume
while the guest is paused, and the guest's own records on it are one
unbroken sequence. host-4 refuses a primary change from a host outside the
cluster. Export from the owner, import into the cluster, and ``vm console``
found through the fleet, on the same lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from ferry.adapters import qemu
from ferry.adapters.pki import client_ssl_context, thumbprint
from ferry.guest.records import read_records
from ferry.host.config import load_host_config
from ferry.peer.https import HttpsTransport
from ferry.peer.replication import UPDATE
from tests.conftest import UP, LabEnv, same_image, seqs, wait

pytestmark = pytest.mark.integration

NODES = ["host-1", "host-2", "host-3"]
REPLICA = "host-4"
VM = "web"


CLUSTER_LAB_STANDALONE = 1  # host-4 beside cluster c1 (tests/integration/conftest.py)


@pytest.fixture(scope="module")
def env(cluster_lab_env: LabEnv) -> LabEnv:
    """Cluster c1 of host-1..3 (lease TTL 4 s, volume csv1) and a standalone host-4."""
    return cluster_lab_env


def status(env: LabEnv, host: str | None = None) -> dict[str, Any]:
    args = ["replication", "status", VM] + (["--host", host] if host else [])
    result: dict[str, Any] = env.cli.json(*args)
    return result


def points(env: LabEnv) -> list[int]:
    return [p["id"] for p in env.cli.json("replication", "points", VM, "--host", REPLICA)]


def sync(env: LabEnv) -> dict[str, Any]:
    outcome: dict[str, Any] = env.cli.json("replication", "sync", VM)
    assert outcome["result"] == "ok", outcome
    return outcome


def replica_equals_disk(env: LabEnv, owner: str) -> int:
    """Pause the guest, cut a point, compare it with the disk; the records' last seq."""
    env.cli("vm", "pause", VM, "--host", owner)
    try:
        sync(env)
        disk = Path(env.vm(VM, owner)["disks"][0]["path"])
        replica = Path(env.vm(VM, REPLICA)["disks"][0]["path"])
        assert same_image(disk, replica), "the replica's latest point differs from the disk"
        ours, theirs = read_records(replica), read_records(disk)
        assert ours.corrupt == 0 and ours.count == ours.last_seq == theirs.last_seq
        return ours.last_seq
    finally:
        env.cli("vm", "resume", VM, "--host", owner)


def lose_node(env: LabEnv, index: int, uuid: str) -> None:
    """SIGKILL host-``index``'s agent and the guest's QEMU (by pidfile and uuid)."""
    host = env.lab.host(index)
    pidfile = host.data_dir / "vms" / uuid / "qemu.pid"
    qemu_pid = qemu.find_process(pidfile, uuid)
    assert qemu_pid is not None, "the guest's QEMU is not running on its owner"
    env.kill_agent(index)
    os.kill(qemu_pid, signal.SIGKILL)
    wait("the QEMU to go", lambda: not Path(f"/proc/{qemu_pid}/cmdline").exists()
         or not Path(f"/proc/{qemu_pid}/cmdline").read_bytes())  # fmt: skip


def claim_as(env: LabEnv, index: int, vm_uuid: str) -> tuple[int, str]:
    """host-``index`` (its own certificate) tells host-4 it is the VM's primary now."""
    host = env.lab.host(index)
    tls = client_ssl_context(host.dir / "tls")
    config = load_host_config(env.lab.host(4).config_path)
    address, port = config.address
    body = {"primary": host.name, "thumbprint": thumbprint(host.dir / "tls" / "client-cert.pem"),
            "primary_url": "https://127.0.0.1:1"}  # fmt: skip

    async def call() -> tuple[int, str]:
        transport = HttpsTransport(REPLICA, f"https://{address}:{port}", tls, timeout=30)
        try:
            reply = await transport.request("PATCH", UPDATE.url(uuid=vm_uuid), body=body)
        finally:
            await transport.close()
        message = ((reply.payload or {}).get("error") or {}).get("message", "")
        return reply.status, str(message)

    return asyncio.run(call())


def test_replication_follows_the_owner_through_a_node_loss(env: LabEnv) -> None:
    cli = env.cli
    storage = env.lab.root / "replicas"
    storage.mkdir()
    cli("replica-server", "enable", "--host", REPLICA, "--storage", str(storage),
        "--allow", "host-*")  # fmt: skip
    cli("vm", "create", VM, "--cluster", "c1", "--volume", "csv1", "--host", "host-1",
        "--guest", "test", "--memory", "128M", "--disk", "64M")  # fmt: skip
    cli("vm", "start", VM)
    env.wait_console(VM, lambda t: t.count("seq ") >= 2)
    uuid = env.vm(VM)["uuid"]
    assert env.vm(VM)["host"] == "host-1" and env.vm(VM)["cluster"] == "c1"

    out = cli("replication", "enable", VM, "--replica", REPLICA, "--frequency", "30s",
              "--recovery-points", "12", "--json")  # fmt: skip
    assert json.loads(out.stdout.splitlines()[-1])["state"] == "replicating"

    # The replica learns which hosts may take the primary's place.
    def replica_knows_the_cluster() -> bool:
        return (status(env, REPLICA).get("primary_cluster") or {}).get("hosts") == NODES

    wait("host-4 to learn the cluster's hosts", replica_knows_the_cluster)
    sync(env)

    # A live move inside the cluster hands replication over as before; the
    # node it moved to publishes it from then on.
    cli("vm", "move", VM, "--to", "host-3")
    assert env.vm(VM)["host"] == "host-3"
    wait("replication to follow the move", lambda: status(env)["primary"] == "host-3")
    assert status(env, REPLICA)["primary"] == "host-3"
    seq_before = replica_equals_disk(env, "host-3")
    before = points(env)
    assert before == sorted(before) and len(before) >= 3
    history = status(env)["success_count"]

    # host-3 is lost: its agent and the guest's QEMU die at once.
    lose_node(env, 3, uuid)
    lost = time.monotonic()
    owner = wait("the guest to run on another node", lambda: (
        (view := env.vm(VM))["state"] == "running" and view["host"] != "host-3"
        and view["host"]))  # fmt: skip
    assert owner in NODES
    log = env.wait_console(VM, lambda t: UP.search(t) is not None, timeout=60)
    up = UP.search(log)
    assert up is not None and int(up.group(1)) >= seq_before  # its records survived
    restarted_s = time.monotonic() - lost

    # The new owner resumed replication from the store and resynchronised first.
    resumed = wait("replication to resume on the new owner", lambda: (
        (s := status(env))["primary"] == owner and s["state"] == "replicating"
        and s["latest_point"] is not None and s["latest_point"] > before[-1] and s))  # fmt: skip
    assert resumed["frequency_s"] == 30 and resumed["replica"] == REPLICA
    assert resumed["success_count"] > history  # the cycle history came along, then grew
    assert status(env, REPLICA)["primary"] == owner
    events = cli.json("cluster", "events", "c1")
    mine = [e for e in events if e["kind"] == "replication-resumed" and e["vm"] == VM]
    assert len(mine) == 1 and mine[0]["node"] == owner, events
    assert "resynchronising by block hashes" in mine[0]["reason"]
    assert "from host-3's last record" in mine[0]["reason"]  # what host-3 published
    jobs = cli.json("job", "list", "--host", owner)
    assert any(j["kind"] == "replication-resync" and j["state"] == "done" for j in jobs), jobs

    # The next cycles land from the new owner; the points stay one unbroken line.
    env.wait_console(VM, lambda t: len(seqs(t)) >= 2)
    seq_after = replica_equals_disk(env, owner)
    assert seq_after > seq_before
    after = points(env)
    assert after == sorted(set(after)), after
    assert [p for p in before if p in after] == [p for p in after if p <= before[-1]]
    assert len([p for p in after if p > before[-1]]) >= 2, (before, after)

    # A host outside the cluster may not make itself the primary; a cluster
    # node may, but only the owner does (and only for itself: table-tested).
    refused = claim_as(env, 4, uuid)
    assert refused[0] == 403 and "nor a host of its cluster 'c1'" in refused[1], refused
    assert status(env, REPLICA)["primary"] == owner
    sync(env)  # the owner's cycles still land

    # vm console through the fleet reaches the owner.
    shown = cli.json("vm", "console", VM)
    assert shown["host"] == owner and UP.search(shown["text"].replace("\r\n", "\n"))

    # host-3 comes back: it drops its old record and never cycles again.
    cli("lab", "up", "--hosts", "4", "--no-guest")
    wait("host-3 to drop its old record", lambda: not old_record(env, 3, uuid), timeout=60)
    assert env.vm(VM)["host"] == owner  # found once, on its owner
    assert status(env, REPLICA)["primary"] == owner
    print(f"restart on {owner} {restarted_s:.1f}s after the node loss; points {before} -> "
          f"{after}")  # fmt: skip


def old_record(env: LabEnv, index: int, vm_uuid: str) -> bool:
    """Whether host-``index``'s catalog still holds a replication relationship of the VM."""
    db = env.lab.host(index).data_dir / "catalog.sqlite"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT 1 FROM replications WHERE vm_uuid = ?", (vm_uuid,)).fetchone()
    return row is not None


def test_export_from_the_owner_and_import_into_the_cluster(env: LabEnv) -> None:
    cli = env.cli
    owner = env.vm(VM)["host"]
    target = env.lab.images_dir / "web-export"
    cli("vm", "export", VM, "--to", str(target), "--live")
    assert (target / "manifest.json").is_file()
    volume = env.lab.root / "clusters" / "c1" / "csv1"
    other = next(n for n in NODES if n != owner)
    before = cli.json("vm", "list")

    # Bad input: one line each, and nothing changes.
    for args, says in [
        (["--cluster", "c1"], "needs both --cluster and --volume"),
        (["--cluster", "c9", "--volume", "csv1"], "unknown cluster 'c9'"),
        (["--cluster", "c1", "--volume", "nope"], "has no volume 'nope'"),
        (["--cluster", "c1", "--volume", "csv1", "--mode", "register"], "--mode register"),
        (["--cluster", "c1", "--volume", "csv1", "--mode", "copy"], "already has"),
    ]:
        line = cli.fails("vm", "import", str(target), "--host", other, *args)
        assert says in line, line
    assert cli.json("vm", "list") == before

    cli("vm", "import", str(target), "--host", other, "--cluster", "c1", "--volume", "csv1",
        "--mode", "new-id", "--name", "web2")  # fmt: skip
    view = env.vm("web2")
    assert view["cluster"] == "c1" and view["host"] == other
    assert all(Path(d["path"]).is_relative_to(volume) for d in view["disks"]), view["disks"]
    cli("vm", "start", "web2")
    log = env.wait_console("web2", lambda t: UP.search(t) is not None, timeout=60)
    assert seqs(log) == sorted(seqs(log))
    cli("vm", "kill", "web2")
    cli("vm", "delete", "web2")
