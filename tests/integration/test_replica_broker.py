"""The replica broker: a cluster as a replica target, with real agents, etcd and QEMU.

One lab for the module: host-1 standalone (the primary), cluster ``c2`` of
host-2 and host-3 (lease TTL 4 s, volume ``csv1`` that both see), host-4
standalone (extended replication onward from c2). In order:
a c2 that does not admit host-1 refuses ``replication enable --replica
cluster:c2`` with one line and nothing changes; then c2 admits host-1, its
node certificates are re-issued with ``c2.cluster.ferry``, and a test guest
on host-1 replicates to ``cluster:c2`` while it writes. The agent of the
node holding the replica VM is SIGKILLed: the next cycle lands on the other
node (the primary is told nothing), the recovery points go on without a gap
and the chain passes ``qemu-img check``; the extension to host-4 goes on from
the new holder, which host-4 takes as its primary. Then ``failover start`` runs the VM
in c2 as a clustered VM (its role, owner and want in c2's store), and
``failover cancel`` takes it out of c2 and makes it c2's replica again.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.adapters.etcd import open_store
from ferry.adapters.pki import load_cert_info
from ferry.guest.records import read_records
from tests.conftest import UP, LabEnv, lab_session, same_image, seqs, wait

pytestmark = pytest.mark.integration

PRIMARY = "host-1"
EXTENDED = "host-4"  # standalone: extended replication onward from c2
C2 = ("host-2", "host-3")
VM = "web"
BOOT_S = 180  # a TCG boot, on a machine shared with other test runs


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, guest_cache: Path) -> Iterator[LabEnv]:
    with lab_session(tmp_path_factory.mktemp("lab")) as env:
        env.lab.up(4, clusters={"c2": list(C2)}, lease_ttl_s=4,
                   host_settings={"image_locking": False})  # fmt: skip
        wait("c2 to settle", lambda: _settled(env), timeout=60)
        env.cli("vm", "create", VM, "--host", PRIMARY, "--guest", "test", "--memory", "128M",
                "--disk", "32M", "--start")  # fmt: skip
        env.wait_console(VM, lambda t: len(seqs(t)) >= 2, timeout=BOOT_S)
        yield env


def _settled(env: LabEnv) -> bool:
    view = env.cli.json("cluster", "show", "c2")
    return bool(view.get("leader")) and all(n["state"] == "up" for n in view["nodes"])


def holder(env: LabEnv, nodes: tuple[str, ...] = C2) -> str | None:
    """The node of c2 whose catalog holds the replica VM."""
    found = []
    for node in nodes:
        result = env.cli("vm", "show", VM, "--host", node, "--json", check=False)
        if result.returncode == 0 and json.loads(result.stdout)["state"] == "replica":
            found.append(node)
    assert len(found) <= 1, f"two nodes hold the replica: {found}"
    return found[0] if found else None


def sync(env: LabEnv) -> dict[str, Any]:
    return dict(env.cli.json("replication", "sync", VM, "--host", PRIMARY))


def point_ids(env: LabEnv) -> list[int]:
    return [p["id"] for p in env.cli.json("replication", "points", VM, "--host", PRIMARY)]


def chain_checks(path: Path) -> None:
    """``qemu-img check`` of the replica's top image and every backing file below it."""
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)],
        capture_output=True, text=True, check=True).stdout)  # fmt: skip
    for image in info:
        done = subprocess.run(["qemu-img", "check", "-U", image["filename"]],
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, f"{image['filename']}: {done.stdout}{done.stderr}"


def store_keys(env: LabEnv, prefix: str) -> list[str]:
    """Keys under ``/ferry/clusters/c2/<prefix>`` in the lab's etcd."""

    async def read() -> list[str]:
        store = open_store([env.lab.etcd.url], env.lab.host(1).dir / "tls")
        try:
            return [e.key for e in await store.range(f"/ferry/clusters/c2/{prefix}")]
        finally:
            await store.close()

    return asyncio.run(read())


def enable_c2(env: LabEnv, allow: str) -> None:
    """c2 a replica server for ``allow``, replica VMs on csv1; node certificates re-issued."""
    env.cli("replica-server", "enable", "--cluster", "c2", "--volume", "csv1", "--allow", allow,
            "--ca", str(env.lab.ca_dir))  # fmt: skip


def test_a_cluster_that_does_not_admit_the_primary_refuses_and_nothing_changes(
    lab: LabEnv,
) -> None:
    cli = lab.cli
    enable_c2(lab, "host-9")
    shown = cli.json("replica-server", "show", "--cluster", "c2")
    assert shown["enabled"] and [e["pattern"] for e in shown["allow"]] == ["host-9"], shown
    assert shown["storage"].endswith("/replicas"), shown
    line = cli.fails("replication", "enable", VM, "--replica", "cluster:c2")
    assert "cluster 'c2' does not accept replication from 'host-1'" in line, line
    assert cli("replication", "status", VM, "--host", PRIMARY, check=False).returncode != 0
    assert holder(lab) is None
    assert store_keys(lab, "replicas/") == []
    line = cli.fails("replication", "enable", VM, "--replica", "cluster:c9")
    assert "unknown cluster 'c9'" in line, line


def test_cycles_follow_the_replica_vm_through_a_node_loss_then_fail_over_into_c2(
    lab: LabEnv,
) -> None:
    cli = lab.cli
    enable_c2(lab, "host-1")
    for index in (2, 3):  # every node's certificate names the cluster now
        cert = load_cert_info(lab.lab.host(index).dir / "tls" / "client-cert.pem")
        assert "c2.cluster.ferry" in cert.dns_names, cert
    started = time.monotonic()
    out = cli("replication", "enable", VM, "--replica", "cluster:c2", "--frequency", "30s",
              "--recovery-points", "12", "--json")  # fmt: skip
    initial_s = time.monotonic() - started
    status = json.loads(out.stdout.splitlines()[-1])
    assert status["state"] == "replicating" and status["replica"] == "cluster:c2", status
    first = holder(lab)
    assert first is not None
    assert store_keys(lab, "replicas/")  # the replica VM's owner and record in c2's store

    cycle_s = []
    for _ in range(3):
        lab.wait_console(VM, lambda t: len(seqs(t)) >= 2, timeout=30)
        t0 = time.monotonic()
        outcome = sync(lab)
        cycle_s.append(time.monotonic() - t0)
        assert outcome["result"] == "ok", outcome
    before = point_ids(lab)

    # Moving the replica from c2 to a host is refused in one line; nothing changes.
    line = cli.fails("replication", "set", VM, "--replica", EXTENDED, "--frequency", "5m")
    assert "replicates to cluster:c2" in line and "from a cluster to a host" in line, line
    kept = cli.json("replication", "status", VM, "--host", PRIMARY)
    assert (kept["replica"], kept["frequency_s"]) == ("cluster:c2", 30), kept
    assert holder(lab) == first and point_ids(lab) == before

    # Extended replication to a cluster is not built: one line, from the replica's node.
    line = cli.fails("replication", "extend", VM, "--to", "cluster:c2", "--host", first)
    assert "to a cluster (cluster:c2) is not built" in line, line

    # Extended onward from the replica cluster to host-4 (it learns c2's nodes).
    extended = lab.lab.root / "extended"
    extended.mkdir()
    cli("replica-server", "enable", "--host", EXTENDED, "--storage", str(extended),
        "--allow", "host-*")  # fmt: skip
    out = cli("replication", "extend", VM, "--to", EXTENDED, "--frequency", "5m", "--json")
    assert json.loads(out.stdout.splitlines()[-1])["state"] == "replicating", out.stdout
    assert cli.json("replication", "status", VM, "--host", EXTENDED)["primary"] == first

    index = int(first.rsplit("-", 1)[1])
    killed_at = time.monotonic()
    # host-4 is down while the replica changes node, so the new holder's claim of the
    # primary's place there cannot land: the extension's next cycle claims it again.
    lab.kill_agent(4)
    lab.kill_agent(index)
    other = next(node for node in C2 if node != first)

    def next_cycle() -> dict[str, Any] | None:
        outcome = lab.cli.json("replication", "sync", VM, "--host", PRIMARY)
        return outcome if outcome["result"] == "ok" else None

    wait("a cycle after the node loss", next_cycle, timeout=120)
    recovered_s = time.monotonic() - killed_at
    assert holder(lab, (other,)) == other
    events = lab.cli.json("cluster", "events", "c2")
    reowned = [e for e in events if e["kind"] == "replica-reowned"]
    assert reowned and reowned[-1]["node"] == other, events
    after = point_ids(lab)
    # The lost node comes back (and host-4): it drops its stale copy, so only the holder
    # shows one.
    lab.restart_agent(index)
    wait("c2 to settle again", lambda: _settled(lab), timeout=60)
    assert wait("the stale copy to go", lambda: holder(lab) == other, timeout=30)
    # The extension goes on from the new holder: host-4 still names the old one, refuses
    # the cycle, and the holder claims the place again and sends.
    assert sync(lab)["result"] == "ok"
    assert cli.json("replication", "status", VM, "--host", EXTENDED)["primary"] == first
    onward = cli.json("replication", "sync", VM, "--host", other)
    assert onward["result"] == "ok", onward
    assert cli.json("replication", "status", VM, "--host", EXTENDED)["primary"] == other
    on_4 = [p["id"] for p in cli.json("replication", "points", VM, "--host", EXTENDED)]
    assert on_4[-1] == point_ids(lab)[-1], on_4
    # No gap: the points before the loss are all still there (12 kept), and the ids go on
    # one by one across it.
    assert set(before) <= set(after) and after[-1] > before[-1], (before, after)
    assert after == list(range(after[0], after[-1] + 1)), after

    # The replica equals the disk with the guest paused; the chain checks clean.
    cli("vm", "pause", VM, "--host", PRIMARY)
    try:
        assert sync(lab)["result"] == "ok"
        disk = Path(lab.vm(VM, PRIMARY)["disks"][0]["path"])
        replica = Path(lab.vm(VM, other)["disks"][0]["path"])
        assert same_image(disk, replica), "the replica's latest point differs from the disk"
        chain_checks(replica)
        ours = read_records(replica)
        assert ours.corrupt == 0 and ours.count == ours.last_seq == read_records(disk).last_seq
        last_seq = ours.last_seq
    finally:
        cli("vm", "resume", VM, "--host", PRIMARY)

    # Fail over into c2: the primary's copy is stopped (a lost site), the VM runs in c2.
    cli("vm", "kill", VM, "--host", PRIMARY)
    out = cli("failover", "start", VM, "--host", other, "--json")
    failed = json.loads(out.stdout.splitlines()[-1])
    assert failed.get("cluster") == "c2", failed
    view = lab.vm(VM, other)
    assert view["state"] == "running" and view.get("cluster") == "c2", view
    keys = store_keys(lab, "vms/")
    uuid = view["uuid"]
    assert {f"/ferry/clusters/c2/vms/{uuid}/{part}" for part in ("config", "owner", "want")} \
        <= set(keys)  # fmt: skip
    assert store_keys(lab, "replicas/") == []
    text = lab.wait_console(VM, lambda t: bool(UP.search(t)), timeout=BOOT_S, host=other)
    match = UP.search(text)
    assert match is not None and int(match.group(1)) >= last_seq, text[-300:]

    # Cancelled after it joined c2: it leaves c2 before it stops (c2's HA does not start
    # it again), is a replica on the same node again, held there in c2's store; the
    # primary's copy runs again and its next cycle lands there.
    out = cli("failover", "cancel", VM, "--host", other, "--json")
    assert json.loads(out.stdout.splitlines()[-1]).get("cancelled") is True, out.stdout
    view = lab.vm(VM, other)
    assert view["state"] == "replica" and not view.get("cluster"), view
    assert not [k for k in store_keys(lab, "vms/") if uuid in k], store_keys(lab, "vms/")
    assert any(uuid in k for k in store_keys(lab, "replicas/")), store_keys(lab, "replicas/")
    events = lab.cli.json("cluster", "events", "c2")
    assert [e for e in events if e["kind"] == "vm-removed" and e.get("vm") == VM], events
    cli("vm", "start", VM, "--host", PRIMARY)
    assert wait("a cycle after the cancel", lambda: sync(lab)["result"] == "ok", timeout=60)
    assert holder(lab) == other and lab.vm(VM, other)["state"] == "replica"
    print(f"\nreplica broker: initial copy {initial_s:.1f} s; cycles "
          f"{', '.join(f'{s:.2f}' for s in cycle_s)} s; node kill -> next good cycle "
          f"{recovered_s:.1f} s; points {before} -> {after}; {first} -> {other}")  # fmt: skip
