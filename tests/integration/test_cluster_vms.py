"""Clustered VMs with real agents, a real etcd and a real QEMU test guest on ``csv1``.

One lab for the module: three nodes of cluster ``c1`` at functional level 2
(every node's ``host.toml``), so the last test can upgrade it node by node to
level 3 with the guest running throughout. In order: bad
input changes nothing; two concurrent placements of one VM, only one wins;
a clustered guest is created, started and shown from any node and moves
inside the cluster with its owner; stop keeps it off, and a start asked on
a node that does not own it brings it back (its owner acts); drain and
resume; a drain that cannot place says which VM and why; the rolling
upgrade; last, a stop asked on a node that does not own it (the guest is not
booted again after it). Polling is in this process (agent calls, in-process
CLI); agents restart only for the upgrade.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from ferry.adapters.etcd import open_store
from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.roles import Owner
from ferry.errors import ConflictError, FerryError
from tests.conftest import LabEnv, lab_session, seqs

pytestmark = pytest.mark.integration

CLUSTER = "c1"
KEYS = ClusterKeys(CLUSTER)
NODES = ("host-1", "host-2", "host-3")


def restart_agents(env: LabEnv, indexes: list[int], **config: object) -> None:
    """Stop these agents (SIGTERM), change their host.toml, start them with one ``Lab.up``
    (in this process: a ``ferry lab up`` would cost a Python start-up more)."""
    for index in indexes:
        pid = env.lab.host(index).pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
    for index in indexes:
        host = env.lab.host(index)
        while host.pid() is not None:
            time.sleep(0.1)
        settings = tomllib.loads(host.config_path.read_text())
        settings.update(config)
        host.config_path.write_text(tomli_w.dumps(settings))
    env.lab.up(len(env.lab.hosts()))


def show(env: LabEnv) -> dict[str, Any]:
    result: dict[str, Any] = env.cli.json("cluster", "show", CLUSTER)
    return result


def agent(env: LabEnv, node: str, method: str, path: str,
          body: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """One call to ``node``'s agent with the admin certificate, in this process."""
    from ferry.client.fleet import Fleet
    from ferry.client.settings import load_settings

    async def go() -> Any:
        async with Fleet(load_settings(env.home)) as fleet:
            return await fleet.client(node).call(method, path, body=body)

    return asyncio.run(go())


def shown_on(env: LabEnv, node: str, vm: str = "g1") -> dict[str, Any]:
    """``GET /v1/vms/{vm}`` on ``node`` itself (owner or not)."""
    result: dict[str, Any] = agent(env, node, "GET", f"/v1/vms/{vm}")
    return result


def nodes(env: LabEnv) -> dict[str, dict[str, Any]]:
    return {node["name"]: node for node in show(env)["nodes"]}


def wait_for(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.3)


class Store:
    """The lab's etcd, read (and in setup written) as a host does, with host-1's certificate."""

    def __init__(self, env: LabEnv) -> None:
        etcd = show(env)["etcd"]
        self.urls = [etcd] if isinstance(etcd, str) else list(etcd)
        self.tls = env.lab.host(1).dir / "tls"

    def run(self, body: Any) -> Any:
        async def go() -> Any:
            store = open_store(self.urls, self.tls)
            try:
                return await body(store)
            finally:
                await store.close()

        return asyncio.run(go())

    def snapshot(self) -> dict[str, bytes]:
        """Every key of the cluster but the events log and the refreshed alive records."""

        async def read(store: Any) -> dict[str, bytes]:
            entries = await store.range(KEYS.prefix)
            return {e.key: e.value for e in entries
                    if not e.key.startswith((KEYS.events, KEYS.alive_prefix))}  # fmt: skip

        result: dict[str, bytes] = self.run(read)
        return result

    def one_more_pass(self, uuid: str, timeout: float = 30) -> bytes:
        """Make the owner's reconciler run a whole pass now, and wait for its end.

        The state the owner published is deleted: the deletion wakes a pass (the
        watch), which decides about the VM and then puts its state again, its last
        step. Returns that state. Faster than sleeping past the fallback pass
        (PASS_EVERY_S) and as sure: a pass that wrongly started the VM would have
        started it before putting its state (``running``).
        """

        async def drop(store: Any) -> None:
            await store.delete(KEYS.vm_state(uuid))

        async def read(store: Any) -> bytes | None:
            entry = await store.get(KEYS.vm_state(uuid))
            return None if entry is None else bytes(entry.value)

        self.run(drop)
        result: bytes = wait_for("a reconcile pass of the owner", lambda: self.run(read),
                                 timeout=timeout)  # fmt: skip
        return result

    def owner(self, uuid: str) -> Owner:
        async def read(store: Any) -> Owner:
            entry = await store.get(KEYS.vm_owner(uuid))
            assert entry is not None, f"VM {uuid} has no owner"
            return Owner.decode(entry.value)

        result: Owner = self.run(read)
        return result


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, guest_cache: Path) -> Iterator[LabEnv]:
    """Cluster c1 of three nodes at functional level 2 (lease TTL 4 s, volume csv1).

    ``cluster_lab_env`` makes its cluster at the software's level; the upgrade
    needs an older one, so ``Lab.up`` writes level 2 into each host.toml before
    the agents first start, then makes the cluster (the lab's etcd; ``lab down``
    stops it).
    """
    with lab_session(tmp_path_factory.mktemp("lab")) as env:
        env.lab.up(3, clusters={CLUSTER: []}, lease_ttl_s=4,
                   host_settings={"functional_level": 2})  # fmt: skip

        def settled() -> bool:
            view = show(env)
            at_two = [n["state"] == "up" and n["functional_level"] == 2 for n in view["nodes"]]
            return bool(view["leader"]) and len(at_two) == 3 and all(at_two)

        wait_for("cluster c1 settled at level 2", settled, timeout=60)
        yield env


@pytest.fixture(scope="module")
def store(env: LabEnv) -> Store:
    return Store(env)


def last_seq(env: LabEnv) -> int:
    return max(seqs(env.console("g1")), default=0)


def keeps_counting(env: LabEnv, timeout: float = 60) -> int:
    """The guest writes a record after the last one seen now; returns that one."""
    seen = last_seq(env)
    env.wait_console("g1", lambda t: max(seqs(t), default=0) > seen, timeout=timeout)
    return seen


def records(env: LabEnv) -> dict[str, Any]:
    """The guest's records on its shared disk (read beside the running QEMU)."""
    disk = env.vm("g1")["disks"][0]["path"]
    result: dict[str, Any] = env.cli.json("guest", "records", disk)
    return result


def volume_path(env: LabEnv) -> Path:
    return Path(next(v["path"] for v in show(env)["volumes"] if v["name"] == "csv1"))


# -- bad input: one line, nothing changed -------------------------------------------


def test_bad_input_is_one_line_and_changes_nothing(env: LabEnv, store: Store) -> None:
    cli = env.cli
    cli("vm", "create", "loner", "--host", "host-1", "--disk", "16M")  # a plain VM, local disk
    before, vms_before = store.snapshot(), cli.json("vm", "list")
    files_before = sorted(volume_path(env).iterdir())
    line = cli.fails("vm", "create", "x", "--cluster", "nope", "--volume", "csv1", "--disk", "16M")
    assert line == ("ferry: error: unknown cluster 'nope': no known host is a node of it "
                    "('ferry cluster list' shows the clusters)")  # fmt: skip
    line = cli.fails("vm", "create", "x", "--cluster", CLUSTER, "--volume", "csv9")
    assert line == "ferry: error: cluster 'c1' has no volume 'csv9' (volumes: csv1)"
    line = cli.fails("cluster", "vm", "add", "loner", "--cluster", CLUSTER)
    assert line.startswith("ferry: error: VM 'loner' cannot join cluster 'c1': disk ")
    assert "is on no cluster volume (volumes: csv1 at " in line
    assert line.endswith("); move its disks there first")
    line = cli.fails("cluster", "vm", "add", "loner", "--cluster", "nope")
    assert line == ("ferry: error: unknown cluster 'nope': host 'host-1' is a node of "
                    "cluster 'c1'")  # fmt: skip
    line = cli.fails("cluster", "upgrade-level", CLUSTER)
    assert line == ("ferry: error: cluster 'c1' is already at functional level 2, the level "
                    "of its newest node")  # fmt: skip
    line = cli.fails("vm", "create", "x", "--cluster", CLUSTER, "--volume", "csv1",
                     "--config-version", "3")  # fmt: skip
    assert line == ("ferry: error: configuration version 3 runs on no node of cluster 'c1' "
                    "(its newest node runs 2)")  # fmt: skip
    line = cli.fails("cluster", "vm", "remove", "loner")
    assert line == "ferry: error: VM 'loner' on host 'host-1' is in no cluster"
    assert store.snapshot() == before
    assert cli.json("vm", "list") == vms_before
    assert sorted(volume_path(env).iterdir()) == files_before
    cli("vm", "delete", "loner")


def test_a_vm_on_the_cluster_volume_is_added_and_removed(env: LabEnv, store: Store) -> None:
    cli = env.cli
    # Every node has the cluster's volumes as host volumes too (moves find disks by them).
    cli("vm", "create", "plain", "--host", "host-2", "--volume", "csv1", "--disk", "16M")
    added = cli.json("cluster", "vm", "add", "plain", "--cluster", CLUSTER, "--priority", "low")
    assert (added["cluster"], added["host"]) == (CLUSTER, "host-2")
    assert store.owner(added["uuid"]).node == "host-2"
    assert env.vm("plain")["cluster"] == CLUSTER
    removed = cli.json("cluster", "vm", "remove", "plain")
    assert removed["cluster"] is None and removed["host"] == "host-2"
    assert not [k for k in store.snapshot() if added["uuid"] in k or k.endswith("/plain")]
    cli("vm", "delete", "plain")


def test_two_concurrent_placements_of_one_vm_one_wins(env: LabEnv, store: Store) -> None:
    """Two nodes create VM 'twin' at once, each placing it on itself: etcd lets one win."""
    from ferry.client.fleet import Fleet
    from ferry.client.settings import load_settings

    body = {"name": "twin", "disks": [{"size": 16 << 20}], "cluster": CLUSTER,
            "volume": "csv1"}  # fmt: skip

    async def both() -> list[Any]:
        async with Fleet(load_settings(env.home)) as fleet:
            calls = [fleet.client(node).call("POST", "/v1/vms", body={**body, "node": node})
                     for node in ("host-1", "host-2")]  # fmt: skip
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(both())
    won = [r for r in results if isinstance(r, dict)]
    lost = [r for r in results if isinstance(r, FerryError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], ConflictError)
    assert str(lost[0]) == "cluster 'c1' already has a VM named 'twin'"
    winner = won[0]
    snap = store.snapshot()
    assert snap[KEYS.name("twin")] == winner["uuid"].encode()
    assert store.owner(winner["uuid"]).node == winner["host"]
    listed = [vm for vm in env.cli.json("vm", "list") if vm["name"] == "twin"]
    assert [(vm["host"], vm["uuid"]) for vm in listed] == [(winner["host"], winner["uuid"])]
    assert [p.name for p in volume_path(env).iterdir() if p.is_dir()] == [winner["uuid"]]
    env.cli("vm", "delete", "twin")
    assert KEYS.name("twin") not in store.snapshot()
    assert not (volume_path(env) / winner["uuid"]).exists()


# -- a clustered guest ----------------------------------------------------------------


def test_a_clustered_guest_runs_is_seen_from_any_node_and_moves_with_its_owner(
    env: LabEnv, store: Store
) -> None:
    cli = env.cli
    created = cli.json("vm", "create", "g1", "--cluster", CLUSTER, "--volume", "csv1",
                       "--guest", "test", "--memory", "128M", "--priority", "high")  # fmt: skip
    assert created["cluster"] == CLUSTER and created["config_version"] == 2
    owner = created["host"]
    assert store.owner(created["uuid"]).node == owner
    uuid = created["uuid"]
    assert all(d["path"].startswith(str(volume_path(env) / uuid)) for d in created["disks"])
    started = cli.json("vm", "start", "g1")  # the CLI finds the owner
    assert started["host"] == owner and started["state"] == "running"
    assert store.snapshot()[KEYS.vm_want(uuid)] == b"running"
    env.wait_console("g1", lambda t: len(seqs(t)) >= 2, timeout=90)
    shown = env.vm("g1")
    assert shown["cluster"] == CLUSTER and shown["host"] == owner
    assert [vm["host"] for vm in cli.json("vm", "list") if vm["name"] == "g1"] == [owner]
    # Any node's agent shows it, from the store: its owner, and the state the owner published.
    other = next(n for n in NODES if n != owner)
    remote = wait_for("the owner's published state", lambda: (
        view if (view := shown_on(env, other))["state"] == "running" else None))  # fmt: skip
    assert (remote["host"], remote["uuid"], remote["cluster"]) == (owner, uuid, CLUSTER)
    assert remote["disks"] == shown["disks"] and remote["pid"] is None

    target = next(n for n in NODES if n != owner)
    lines = cli("vm", "move", "g1", "--to", target, "--json").stdout.splitlines()
    result = json.loads(lines[-1])  # event lines, then the result
    assert result["host"] == target and result["storage"] == "shared"
    assert store.owner(uuid) == Owner(node=target, since=store.owner(uuid).since)
    shown = env.vm("g1")
    assert (shown["host"], shown["state"]) == (target, "running")
    wait_for("the arrived VM is known as clustered", lambda: env.vm("g1")["cluster"] == CLUSTER)
    assert nodes(env)[target]["vms"] == 1 and nodes(env)[owner]["vms"] == 0
    keeps_counting(env)
    line = cli.fails("vm", "move", "g1", "--to", owner, "--storage", "copy")
    assert "its disks are not copied" in line


def test_stop_keeps_it_off_and_start_from_another_node_brings_it_back(
    env: LabEnv, store: Store
) -> None:
    cli = env.cli
    shown = env.vm("g1")
    uuid, owner = shown["uuid"], shown["host"]
    cli("vm", "stop", "g1", "--timeout", "5s")
    assert store.snapshot()[KEYS.vm_want(uuid)] == b"off"
    other = next(n for n in NODES if n != owner)
    wait_for("its state published", lambda: shown_on(env, other)["state"] == "off")
    # One more whole pass of the owner's reconciler: nobody starts it again.
    assert store.one_more_pass(uuid) == b"off"
    assert shown_on(env, owner)["state"] == "off"
    # Started on a node that does not own it: want running, and the owner starts it.
    reply = agent(env, other, "POST", "/v1/vms/g1/start")
    assert (reply["host"], reply["want"], reply["owner_acts"]) == (owner, "running", True)
    assert store.snapshot()[KEYS.vm_want(uuid)] == b"running"
    # (the console is the last run's until the owner's start begins a new one)
    wait_for("the owner started it", lambda: shown_on(env, owner)["state"] == "running",
             timeout=120)  # fmt: skip
    assert env.vm("g1")["host"] == owner
    env.wait_console("g1", lambda t: len(seqs(t)) >= 1, timeout=120)


def test_drain_moves_the_guest_live_and_resume_takes_vms_again(env: LabEnv, store: Store) -> None:
    cli = env.cli
    owner = env.vm("g1")["host"]
    uuid = env.vm("g1")["uuid"]
    lines = cli("cluster", "drain", owner, "--cluster", CLUSTER, "--json").stdout.splitlines()
    final = json.loads(lines[-1])
    assert final["result"] == "ok" and final["node"] == owner
    [moved] = final["moved"]
    assert moved["vm"] == "g1" and moved["live"] and moved["to"] != owner
    assert nodes(env)[owner]["state"] == "draining"
    assert store.owner(uuid).node == moved["to"] and env.vm("g1")["host"] == moved["to"]
    keeps_counting(env)
    line = cli.fails("vm", "create", "x", "--cluster", CLUSTER, "--volume", "csv1",
                     "--host", owner)  # fmt: skip
    assert line == (f"ferry: error: cannot place VM 'x' (256M, configuration version 2): "
                    f"{owner} is draining")  # fmt: skip
    cli("cluster", "resume", owner, "--cluster", CLUSTER)
    assert nodes(env)[owner]["state"] == "up"


def test_a_drain_that_cannot_place_a_vm_stops_and_says_which(env: LabEnv, store: Store) -> None:
    cli = env.cli
    owner = env.vm("g1")["host"]
    others = [n for n in NODES if n != owner]
    for node in others:
        cli("cluster", "drain", node, "--cluster", CLUSTER)  # they own nothing now
    before = store.snapshot()
    line = cli.fails("cluster", "drain", owner, "--cluster", CLUSTER)
    reasons = "; ".join(sorted([f"{n} is draining" for n in others]
                               + [f"{owner} is where the VM is now"]))  # fmt: skip
    assert line == (f"ferry: error: drain of {owner} stopped at VM 'g1': cannot place VM "
                    f"'g1' (128M, configuration version 2): {reasons}")  # fmt: skip
    after = store.snapshot()
    assert {k: v for k, v in after.items() if "/members/" not in k} == {
        k: v for k, v in before.items() if "/members/" not in k}  # fmt: skip
    assert env.vm("g1")["host"] == owner and env.vm("g1")["state"] == "running"
    for node in NODES:
        cli("cluster", "resume", node, "--cluster", CLUSTER)
    assert {n["state"] for n in nodes(env).values()} == {"up"}


# -- rolling upgrade ------------------------------------------------------------------


def test_rolling_upgrade_node_by_node_with_the_guest_running(env: LabEnv, store: Store) -> None:
    cli = env.cli
    uuid = env.vm("g1")["uuid"]
    for index, node in enumerate(NODES, start=1):
        cli("cluster", "drain", node, "--cluster", CLUSTER)
        assert env.vm("g1")["host"] != node
        restart_agents(env, [index], functional_level=3)
        wait_for(f"{node} back at level 3", lambda node=node: nodes(env)[node]["functional_level"]
                 == 3 and nodes(env)[node]["state"] == "draining")  # fmt: skip
        cli("cluster", "resume", node, "--cluster", CLUSTER)
        keeps_counting(env)
        if index < len(NODES):
            older = ", ".join(f"{n} (2)" for n in NODES[index:])
            line = cli.fails("cluster", "upgrade-level", CLUSTER)
            which = "node" if index == 2 else "nodes"
            assert line.startswith(f"ferry: error: cannot raise cluster 'c1' to functional "
                                   f"level 3: {which} {older} ")  # fmt: skip
            assert show(env)["functional_level"] == 2
    result = cli.json("cluster", "upgrade-level", CLUSTER)
    assert result == {"cluster": CLUSTER, "functional_level": 3, "was": 2}
    assert show(env)["functional_level"] == 3
    # The guest ran through it all: its shared disk holds one unbroken run of records.
    seen = keeps_counting(env)
    found = records(env)
    assert found["corrupt"] == 0 and found["count"] == found["last_seq"] >= seen
    assert env.vm("g1")["config_version"] == 2 and env.vm("g1")["state"] == "running"
    assert store.owner(uuid).node in NODES
    new = cli.json("vm", "create", "g2", "--cluster", CLUSTER, "--volume", "csv1",
                   "--disk", "16M")  # fmt: skip
    assert new["config_version"] == 3
    cli("vm", "delete", "g2")


def test_stop_from_a_node_that_does_not_own_it(env: LabEnv, store: Store) -> None:
    """The owner's reconciler stops it cleanly; it stays off past a pass."""
    shown = env.vm("g1")
    uuid, owner = shown["uuid"], shown["host"]
    assert shown["state"] == "running"
    other = next(n for n in NODES if n != owner)
    reply = agent(env, other, "POST", "/v1/vms/g1/stop", {})
    assert (reply["host"], reply["want"], reply["owner_acts"]) == (owner, "off", True)
    assert reply["uuid"] == uuid and reply["cluster"] == CLUSTER
    assert store.snapshot()[KEYS.vm_want(uuid)] == b"off"
    wait_for("the owner stopped it", lambda: shown_on(env, owner)["state"] == "off", timeout=60)
    events = env.cli.json("cluster", "events", CLUSTER)
    [stopped] = [e for e in events if e["kind"] == "vm-stopped" and e["vm"] == "g1"
                 and e["reason"].startswith("wanted off")]  # fmt: skip
    assert (stopped["node"], stopped["reason"]) == (owner, "wanted off: shut down cleanly")
    wait_for("its state published", lambda: shown_on(env, other)["state"] == "off")
    assert store.one_more_pass(uuid) == b"off"  # a whole pass later: nobody starts it again
    assert shown_on(env, owner)["state"] == "off"
    assert store.snapshot()[KEYS.vm_want(uuid)] == b"off"
    # The CLI with --host naming that node: the store's view, and the owner acts.
    assert (env.vm("g1", host=other)["host"], env.vm("g1", host=other)["state"]) == (owner, "off")
    said = env.cli("vm", "stop", "g1", "--host", other).stdout.strip()
    assert said == f"VM g1 is wanted off: its owner {owner} stops it"
