"""``ferry lab up --cluster``: the lab's etcd and cluster c1 as the fixture makes them,
``lab up`` again changes nothing, bad ``--cluster`` input is refused in one line
and changes nothing; ``lab status`` shows etcd (``lab down`` is the fixture's)."""

from __future__ import annotations

import re
import time
import tomllib
from pathlib import Path

import pytest

from ferry.adapters.etcd_server import EtcdServer
from ferry.errors import FerryError
from ferry.host.cluster.guard import GuardPaths
from ferry.host.config import load_host_config
from ferry.lab import Lab
from tests.conftest import LabEnv
from tests.integration.conftest import CLUSTER, CLUSTER_LEASE_TTL_S

pytestmark = pytest.mark.integration


def _pids(env: LabEnv) -> dict[str, int | None]:
    pids = {h.name: h.pid() for h in env.lab.hosts()}
    pids["etcd"] = env.lab.etcd.pid()
    return pids


def test_the_cluster_lab(cluster_lab_env: LabEnv) -> None:
    env = cluster_lab_env
    status = env.cli.json("lab", "status")
    etcd = EtcdServer(env.lab.root / "etcd", env.lab.ca_dir)
    assert status["etcd"] == {"url": etcd.url, "pid": etcd.pid(), "running": True}
    assert etcd.pid() is not None
    view = env.cli.json("cluster", "show", CLUSTER)
    assert sorted(n["name"] for n in view["nodes"]) == ["host-1", "host-2", "host-3"]
    assert {n["state"] for n in view["nodes"]} == {"up"}
    assert view["leader"] in {"host-1", "host-2", "host-3"}
    assert view["etcd"] == [etcd.url]
    assert view["volumes"] == [
        {"name": "csv1", "path": str(env.lab.root / "clusters" / CLUSTER / "csv1")}
    ]
    for host in env.lab.hosts():
        config = tomllib.loads(host.config_path.read_text())
        assert config["cluster_lease_ttl"] == CLUSTER_LEASE_TTL_S


def test_lab_up_again_changes_nothing(cluster_lab_env: LabEnv) -> None:
    env = cluster_lab_env
    before = _pids(env)
    events = len(env.cli.json("cluster", "events", CLUSTER))
    env.cli("lab", "up", "--hosts", "3", "--cluster", CLUSTER,
            "--lease-ttl", str(CLUSTER_LEASE_TTL_S), "--no-guest")  # fmt: skip
    assert _pids(env) == before, "an agent or etcd was restarted"
    assert len(env.cli.json("cluster", "events", CLUSTER)) == events, "nobody joined again"


BAD = [
    ({"c1": ["host-1", "host-7"]}, None, "no lab host 'host-7'"),
    ({"c9": ["host-1"]}, None, "host-1 is a node of cluster c1, not c9"),
    ({"c1": [], "c2": ["host-2"]}, None, "cannot be in clusters c1 and c2"),
    ({"bad/name": []}, None, "cluster name"),
    ({}, 1, "lease TTL must be 2..300"),
]


def test_bad_cluster_input_is_refused_and_changes_nothing(cluster_lab_env: LabEnv) -> None:
    env = cluster_lab_env
    before = _pids(env)
    tomls = {h.name: h.config_path.read_text() for h in env.lab.hosts()}
    for clusters, ttl, says in BAD:  # through the Lab API in this process: CLI start-ups are slow
        with pytest.raises(FerryError, match=re.escape(says)):
            Lab(env.lab.root).up(3, clusters=clusters, lease_ttl_s=ttl)
    # And as the CLI says it: one line.
    assert "use NAME or NAME=HOST,HOST" in env.cli.fails("lab", "up", "--no-guest", "--hosts",
                                                         "3", "--cluster", "c1=")  # fmt: skip
    line = env.cli.fails("lab", "up", "--no-guest", "--hosts", "3", "--cluster", "c9=host-2")
    assert "host-2 is a node of cluster c1, not c9" in line
    assert _pids(env) == before
    assert {h.name: h.config_path.read_text() for h in env.lab.hosts()} == tomls
    assert not (env.lab.root / "clusters" / "c9").exists()
    assert not (env.lab.root / "clusters" / "c2").exists()
    assert [v["name"] for v in env.cli.json("cluster", "show", CLUSTER)["volumes"]] == ["csv1"]


def test_lab_crash_kills_a_host_whole_and_lab_up_brings_it_back(cluster_lab_env: LabEnv) -> None:
    env = cluster_lab_env
    host = env.lab.host(3)
    config = load_host_config(host.config_path)
    guard = GuardPaths.of_host(config.name, config.data_dir, config.runtime_dir)
    agent_pid, guard_pid = host.pid(), guard.pid()
    assert agent_pid is not None and guard_pid is not None
    crashed = env.cli.json("lab", "crash", "host-3")
    assert crashed["killed"] == [f"agent pid {agent_pid}", f"fence guard pid {guard_pid}"]
    deadline = time.monotonic() + 10
    while Path(f"/proc/{guard_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the guard is no child of ours: init reaps it
    assert host.pid() is None and not Path(f"/proc/{guard_pid}").exists()
    assert "no host 'host-9'" in env.cli.fails("lab", "crash", "host-9")
    env.cli("lab", "up", "--hosts", "3", "--cluster", CLUSTER,
            "--lease-ttl", str(CLUSTER_LEASE_TTL_S), "--no-guest")  # fmt: skip
    assert host.pid() not in (None, agent_pid)
    deadline = time.monotonic() + 30
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {n["name"]: n["state"] for n in env.cli.json("cluster", "show", CLUSTER)["nodes"]}
        if set(states.values()) == {"up"}:
            break
        time.sleep(0.3)
    assert set(states.values()) == {"up"}, states
