"""Cluster membership with real agents and a real etcd (TLS with the lab's CA).

One lab of three hosts (lease TTL 4 s) and one etcd member for the module;
the tests run in order on it: bad input first (each one line, nothing
changed), then create/join/show/list/events, a volume that one node does not
see (its agent runs in a mount namespace of its own with a tmpfs over the
path, as a node whose NFS mount is missing), a node that owns a VM and wants
to leave, the leader's loss and a new leader, and the last node.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from ferry.adapters import loopback
from ferry.adapters.etcd import open_store
from ferry.adapters.etcd_server import EtcdServer
from ferry.core.cluster.keys import ClusterKeys
from ferry.lab import Lab
from tests.conftest import Cli, _lab_processes

pytestmark = pytest.mark.integration

TTL_S = 4
KEYS = ClusterKeys("c1")


@dataclass
class ClusterLab:
    lab: Lab
    cli: Cli
    etcd: EtcdServer
    root: Path

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 30.0) -> float:
        """Poll ``check`` until it holds; the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if check():
                return time.monotonic() - start
            time.sleep(0.2)
        raise AssertionError(f"{what}: not within {timeout}s")

    def show(self, name: str = "c1") -> dict[str, Any]:
        result: dict[str, Any] = self.cli.json("cluster", "show", name)
        return result

    def states(self) -> dict[str, str]:
        return {n["name"]: n["state"] for n in self.show()["nodes"]}

    def store_keys(self) -> list[tuple[str, bytes]]:
        """Every key and value in etcd (read with host-1's certificate)."""

        async def read() -> list[tuple[str, bytes]]:
            store = open_store([self.etcd.url], self.lab.host(1).dir / "tls")
            try:
                return [(e.key, e.value) for e in await store.range("/ferry/")]
            finally:
                await store.close()

        return asyncio.run(read())

    def cluster_files(self) -> dict[str, str | None]:
        files = {}
        for index in (1, 2, 3):
            path = self.lab.host(index).data_dir / "cluster.json"
            files[f"host-{index}"] = path.read_text() if path.exists() else None
        return files


def _stop_agent(lab: Lab, index: int, sig: int = signal.SIGTERM) -> None:
    host = lab.host(index)
    pid = host.pid()
    if pid is not None:
        os.kill(pid, sig)
    while host.pid() is not None:
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster_lab(tmp_path_factory: pytest.TempPathFactory, guest_cache: Path
                ) -> Iterator[ClusterLab]:  # fmt: skip
    root = tmp_path_factory.mktemp("clusterlab")
    home = root / "home"
    old_home = os.environ.get("FERRY_HOME")
    os.environ["FERRY_HOME"] = str(home)
    lab = Lab(root / "lab")
    etcd = EtcdServer(root / "etcd", lab.ca_dir)
    try:
        lab.up(3)
        # A short lease for the tests: written into each host.toml, agents restarted.
        for index in (1, 2, 3):
            host = lab.host(index)
            settings = json.loads(json.dumps(__import__("tomllib").loads(
                host.config_path.read_text())))  # fmt: skip
            settings["cluster_lease_ttl"] = TTL_S
            _stop_agent(lab, index)
            host.config_path.write_text(tomli_w.dumps(settings))
        etcd.start()
        lab.up(3)
        yield ClusterLab(lab, Cli(home), etcd, root)
    finally:
        lab.down()
        etcd.stop()
        if old_home is None:
            os.environ.pop("FERRY_HOME", None)
        else:
            os.environ["FERRY_HOME"] = old_home
        left = _lab_processes(root)
        assert not left, f"processes left running: {left}"


def test_bad_input_before_the_cluster_exists(cluster_lab: ClusterLab) -> None:
    cli = cluster_lab.cli
    dead = f"https://127.0.0.1:{loopback.free_port()}"
    assert dead in cli.fails("cluster", "create", "c1", "--etcd", dead, "--host", "host-1")
    line = cli.fails("cluster", "join", "c1", "--host", "host-2", "--etcd",
                     f"{dead},{dead.replace('https', 'http')}")  # fmt: skip
    assert dead in line
    assert cli.fails("cluster", "show", "nope") == (
        "ferry: error: unknown cluster 'nope': no known host is a node of it "
        "('ferry cluster list' shows the clusters)")  # fmt: skip
    assert "unknown cluster 'nope'" in cli.fails("cluster", "join", "nope", "--host", "host-2")
    line = cli.fails("cluster", "join", "nope", "--host", "host-2", "--etcd",
                     cluster_lab.etcd.url)  # fmt: skip
    assert line == f"ferry: error: no cluster named 'nope' in etcd at {cluster_lab.etcd.url}"
    assert "must look like https://HOST:PORT" in cli.fails(
        "cluster", "create", "c1", "--etcd", "127.0.0.1:2379", "--host", "host-1"
    )
    assert "pass --host" in cli.fails("cluster", "create", "c1", "--etcd", cluster_lab.etcd.url)
    assert cluster_lab.store_keys() == []
    assert cluster_lab.cluster_files() == {"host-1": None, "host-2": None, "host-3": None}
    assert cli.json("cluster", "list") == []


def test_create_join_show_list_and_events(cluster_lab: ClusterLab) -> None:
    cli = cluster_lab.cli
    url = cluster_lab.etcd.url
    created = cli.json("cluster", "create", "c1", "--etcd", url, "--host", "host-1")
    assert (created["name"], created["node"], created["etcd"]) == ("c1", "host-1", [url])
    for host in ("host-2", "host-3"):
        cli("cluster", "join", "c1", "--host", host)
    # Each host's cluster.json names the cluster and its current lease.
    for host, text in cluster_lab.cluster_files().items():
        assert text is not None, host
        saved = json.loads(text)
        assert (saved["name"], saved["etcd"], saved["etcd_tls"]) == ("c1", [url], None)
    took = cluster_lab.wait("a leader", lambda: cluster_lab.show()["leader"] is not None)
    assert took < 2 * TTL_S
    view = cluster_lab.show()
    assert view["name"] == "c1" and view["etcd"] == [url] and view["functional_level"] == 3
    assert [(n["name"], n["state"], n["vms"]) for n in view["nodes"]] == [
        ("host-1", "up", 0), ("host-2", "up", 0), ("host-3", "up", 0)]  # fmt: skip
    assert all(n["memory_free"] > 0 and n["url"].startswith("https://127.0.0.1:")
               for n in view["nodes"])  # fmt: skip
    assert view["volumes"] == []
    listed = cli.json("cluster", "list")
    up = [{"name": f"host-{i}", "state": "up"} for i in (1, 2, 3)]
    assert listed == [{"name": "c1", "etcd": [url], "leader": view["leader"],
                       "functional_level": 3, "error": None, "nodes": up}]  # fmt: skip
    table = cli("cluster", "show", "c1").stdout
    assert "host-2" in table and "leader" in table
    kinds = [(e["kind"], e["node"]) for e in cli.json("cluster", "events", "c1")]
    joins = [k for k in kinds if k[0] != "leader-elected"][:4]
    assert joins == [("cluster-created", "host-1"), ("node-joined", "host-1"),
                     ("node-joined", "host-2"), ("node-joined", "host-3")]  # fmt: skip
    assert ("leader-elected", view["leader"]) in kinds
    assert "cluster-created" in cli("cluster", "events", "c1").stdout


def test_a_second_cluster_is_refused_and_changes_nothing(cluster_lab: ClusterLab) -> None:
    cli = cluster_lab.cli
    before = (cluster_lab.store_keys(), cluster_lab.cluster_files())
    line = cli.fails("cluster", "create", "c2", "--etcd", cluster_lab.etcd.url, "--host", "host-2")
    assert line == ("ferry: error: host host-2 is already a node of cluster c1; a host is in "
                    "one cluster at a time (leave it first: ferry cluster leave c1 --host "
                    "host-2)")  # fmt: skip
    assert "already a node of cluster c1" in cli.fails("cluster", "join", "c1", "--host",
                                                         "host-3")  # fmt: skip
    after = (cluster_lab.store_keys(), cluster_lab.cluster_files())
    # Only the alive records' refreshed numbers ("at", "memory_free") may differ.
    assert [k for k, _ in after[0]] == [k for k, _ in before[0]] and after[1] == before[1]


def test_a_volume_one_node_does_not_see_is_refused_naming_it(cluster_lab: ClusterLab) -> None:
    shared = cluster_lab.lab.root / "clusters" / "c1" / "csvx"
    shared.mkdir(parents=True)
    lab = cluster_lab.lab
    host = lab.host(3)
    _stop_agent(lab, 3)
    # host-3's agent in its own mount namespace, with an empty tmpfs over the path.
    script = f"mount -t tmpfs ferry-test {shared} && exec {sys.executable} -m ferry agent " \
             f"--config {host.config_path}"  # fmt: skip
    with host.log_path.open("ab") as log:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                 script], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        cluster_lab.wait("host-3 up again", lambda: host.pid() == proc.pid
                         and cluster_lab.states()["host-3"] == "up")  # fmt: skip
        before = cluster_lab.store_keys()
        line = cluster_lab.cli.fails("cluster", "volume", "add", "csvx", str(shared),
                                     "--cluster", "c1")  # fmt: skip
        assert line == (
            f"ferry: error: volume 'csvx' refused: node host-3 does not see the directory at "
            f"{shared} that nodes host-1, host-2 see (probe files missing); every node must "
            "see the same directory")  # fmt: skip
        assert [k for k, _ in cluster_lab.store_keys()] == [k for k, _ in before]
        assert list(shared.iterdir()) == []
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
    lab.up(3)
    cluster_lab.wait("host-3 back", lambda: cluster_lab.states()["host-3"] == "up")
    added = cluster_lab.cli.json("cluster", "volume", "add", "csvx", str(shared),
                                 "--cluster", "c1")  # fmt: skip
    assert added == {"name": "csvx", "path": str(shared)}
    assert list(shared.iterdir()) == []
    assert cluster_lab.show()["volumes"] == [{"name": "csvx", "path": str(shared)}]
    assert "already has a volume named 'csvx'" in cluster_lab.cli.fails(
        "cluster", "volume", "add", "csvx", str(shared), "--cluster", "c1"
    )
    assert "unknown cluster 'c9'" in cluster_lab.cli.fails(
        "cluster", "volume", "add", "v", str(shared), "--cluster", "c9"
    )


def test_a_node_that_owns_a_vm_cannot_leave(cluster_lab: ClusterLab) -> None:
    vm_uuid = str(uuidlib.uuid4())

    async def put(owner: str | None) -> None:
        store = open_store([cluster_lab.etcd.url], cluster_lab.lab.host(1).dir / "tls")
        try:
            if owner is None:
                await store.delete(KEYS.vm_owner(vm_uuid))
                await store.delete(KEYS.name("owned"))
            else:
                # The owner record of a VM that should be off (nothing starts it).
                await store.put(KEYS.name("owned"), vm_uuid.encode())
                await store.put(
                    KEYS.vm_owner(vm_uuid),
                    json.dumps({"node": owner, "since": time.time()}).encode(),
                )
        finally:
            await store.close()

    asyncio.run(put("host-2"))
    try:
        before = cluster_lab.cluster_files()
        line = cluster_lab.cli.fails("cluster", "leave", "c1", "--host", "host-2")
        assert line == ("ferry: error: node host-2 still owns 1 VM(s) of cluster c1 (owned); "
                        "drain it first (ferry cluster drain host-2 --cluster c1) or remove "
                        "them from the cluster")  # fmt: skip
        assert cluster_lab.cluster_files() == before
        assert cluster_lab.states()["host-2"] == "up"
        assert cluster_lab.show()["nodes"][1]["vms"] == 1
    finally:
        asyncio.run(put(None))


def test_the_leader_lost_another_leads_and_the_node_comes_back(cluster_lab: ClusterLab) -> None:
    lab = cluster_lab.lab
    leader = cluster_lab.show()["leader"]
    index = int(leader.rsplit("-", 1)[1])
    _stop_agent(lab, index, signal.SIGKILL)
    killed = time.monotonic()
    cluster_lab.wait("a new leader", lambda: cluster_lab.show()["leader"] not in (None, leader))
    took = time.monotonic() - killed
    print(f"new leader {took:.2f}s after the leader's SIGKILL (TTL {TTL_S}s)")
    # etcd expires the lease after TTL; the watch on the leader key starts a round at once.
    assert took < TTL_S + 2, took
    assert cluster_lab.states()[leader] == "down"
    events = cluster_lab.cli.json("cluster", "events", "c1")
    new = cluster_lab.show()["leader"]
    assert any(e["kind"] == "leader-elected" and e["node"] == new for e in events)
    assert any(e["kind"] == "node-down" and e["node"] == leader for e in events)
    lab.up(3)
    cluster_lab.wait("the old leader back up", lambda: cluster_lab.states()[leader] == "up")
    assert cluster_lab.show()["leader"] == new  # a returning node does not take over
    back = [e for e in cluster_lab.cli.json("cluster", "events", "c1")
            if e["kind"] == "node-reconnected" and e["node"] == leader]  # fmt: skip
    assert back and "new lease" in back[-1]["reason"]


def test_nodes_leave_and_the_last_one_cannot(cluster_lab: ClusterLab) -> None:
    cli = cluster_lab.cli
    for host in ("host-2", "host-3"):
        assert cli.json("cluster", "leave", "c1", "--host", host) == {
            "name": "c1", "node": host, "left": True}  # fmt: skip
    assert [n["name"] for n in cluster_lab.show()["nodes"]] == ["host-1"]
    files = cluster_lab.cluster_files()
    assert files["host-2"] is None and files["host-3"] is None
    cluster_lab.wait("host-1 leads", lambda: cluster_lab.show()["leader"] == "host-1")
    before = (cluster_lab.store_keys(), files)
    assert cli.fails("cluster", "leave", "c1", "--host", "host-1") == (
        "ferry: error: node host-1 is the last node of cluster c1; a cluster keeps at least "
        "one node")  # fmt: skip
    after = (cluster_lab.store_keys(), cluster_lab.cluster_files())
    assert [k for k, _ in after[0]] == [k for k, _ in before[0]] and after[1] == before[1]
    assert "not a node of cluster 'c1' (it is in no cluster)" in cli.fails(
        "cluster", "leave", "c1", "--host", "host-2"
    )
    kinds = [(e["kind"], e["node"]) for e in cli.json("cluster", "events", "c1")]
    assert ("node-left", "host-2") in kinds and ("node-left", "host-3") in kinds
