"""Every peer endpoint authorises the caller *for that object* (issue 11).

A host certificate of the ferry CA only proves that the caller is a ferry
host. Here a third lab host (host-3), with its real certificate over real
mutual TLS, calls every peer endpoint about objects that belong to host-1 and
host-2: a VM replicated from host-1 to host-2 and a VM that moved from host-1
to host-2. Each call is refused with 403 and one line, and afterwards the
VMs, relationships, recovery points and jobs on every host are as before.

The table is checked against the peer layer's routes, so a new endpoint
without an entry here fails the test.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

import pytest

import ferry.peer
from ferry.adapters.catalog import Catalog
from ferry.adapters.pki import client_ssl_context
from ferry.host.config import load_host_config
from ferry.peer.https import HttpsTransport
from ferry.peer.routes import Route
from tests.conftest import LabEnv

pytestmark = pytest.mark.integration

REPLICATED = "authz"
MOVED = "authz-moved"

# Endpoints any ferry host may call, and why; everything else must refuse host-3.
OPEN_TO_ANY_HOST = {
    ("GET", "/v1/peer/hello"): "says who answers and who asked, nothing about any VM",
    ("GET", "/v1/peer/replica-server/admission"): "answers for the caller itself",
    ("POST", "/v1/peer/migrations"): "any host of the CA may offer a new VM by live move",
    ("POST", "/v1/peer/migrations/check"): "asks whether this host has a VM's networks, "
    "before a move; changes nothing",
    ("PUT", "/v1/peer/probe"): "the planner's bandwidth probe: at most 256 MiB, read and "
    "dropped, nothing kept and nothing about any VM",
}


def _url(lab_env: LabEnv, index: int) -> str:
    config = load_host_config(lab_env.lab.host(index).config_path)
    address, port = config.address
    return f"https://{address}:{port}"


def _peer_routes() -> list[Route[Any, Any]]:
    routes: list[Route[Any, Any]] = []
    for info in pkgutil.iter_modules(ferry.peer.__path__):
        module = importlib.import_module(f"ferry.peer.{info.name}")
        routes += [value for value in vars(module).values() if isinstance(value, Route)]
    return routes


@pytest.fixture(scope="module")
def world(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """host-1 replicates REPLICATED to host-2; MOVED moved from host-1 to host-2."""
    cli = lab_env.cli
    cli("lab", "up", "--hosts", "3", "--no-guest")
    storage = tmp_path_factory.mktemp("replicas")
    cli("replica-server", "enable", "--host", "host-2", "--storage", str(storage),
        "--allow", "host-1")  # fmt: skip
    for name in (REPLICATED, MOVED):
        cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "96M",
            "--disk", "32M", "--start")  # fmt: skip
    lab_env.wait_console(REPLICATED, lambda t: t.count("seq ") >= 2)
    lab_env.wait_console(MOVED, lambda t: "seq " in t)
    cli("replication", "enable", REPLICATED, "--replica", "host-2", "--frequency", "15m")
    cli("vm", "move", MOVED, "--to", "host-2")
    move = next(j for j in cli.json("job", "list", "--host", "host-2")
                if j["kind"] == "incoming" and j["vm"] == MOVED)  # fmt: skip
    replicated = lab_env.vm(REPLICATED, "host-1")
    moved = lab_env.vm(MOVED, "host-2")
    catalog = Catalog(lab_env.lab.host(1).data_dir)
    try:
        rel = catalog.relationship(replicated["uuid"])
    finally:
        catalog.close()
    assert rel is not None
    try:
        yield {"replicated": replicated, "moved": moved, "move_job": move["id"],
               "relationship": rel.model_dump(mode="json")}  # fmt: skip
    finally:
        cli("replication", "remove", REPLICATED, "--host", "host-1", check=False)
        for host in ("host-1", "host-2", "host-3"):
            for name in (REPLICATED, MOVED):
                cli("vm", "delete", name, "--force", "--host", host, check=False)


def _calls(world: dict[str, Any], lab_env: LabEnv) -> dict[tuple[str, str], dict[str, Any]]:
    """(method, path) -> the host asked, path params, and a valid body or upload."""
    uuid = world["replicated"]["uuid"]
    moved_uuid = world["moved"]["uuid"]
    job = world["move_job"]
    rel = dict(world["relationship"])
    spec = {"uuid": uuid, "name": REPLICATED, "config_version": 1, "memory": 96 * 1024**2}
    hijack = {**rel, "vm_uuid": moved_uuid, "vm_name": MOVED, "primary": "host-2",
              "replica": "host-3", "pending": [], "in_flight": None}  # fmt: skip
    return {
        ("POST", "/v1/peer/replicas"): {
            "host": 2,
            "body": {"spec": spec, "frequency_s": 30, "recovery_points": 4, "functional_level": 3},
        },
        ("GET", "/v1/peer/replicas/{uuid}"): {"host": 2, "params": {"uuid": uuid}},
        ("PATCH", "/v1/peer/replicas/{uuid}"): {
            "host": 2,
            "params": {"uuid": uuid},
            "body": {"primary": "host-3"},
        },
        ("DELETE", "/v1/peer/replicas/{uuid}"): {"host": 2, "params": {"uuid": uuid}},
        ("PUT", "/v1/peer/replicas/{uuid}/points/{id}"): {
            "host": 2,
            "params": {"uuid": uuid, "id": "99"},
            "query": {"time": "1.0"},
            "data": b"not a delta stream",
        },
        ("GET", "/v1/peer/replicas/{uuid}/points"): {"host": 2, "params": {"uuid": uuid}},
        ("PUT", "/v1/peer/replicas/{uuid}/files/{kind}"): {
            "host": 2,
            "params": {"uuid": uuid, "kind": "kernel"},
            "data": b"not a kernel",
        },
        ("GET", "/v1/peer/replicas/{uuid}/hashes"): {
            "host": 2,
            "params": {"uuid": uuid},
            "query": {"block_size": str(1 << 20)},
        },
        ("POST", "/v1/peer/replicas/{uuid}/move"): {
            "host": 2,
            "params": {"uuid": uuid},
            "body": {"to": "host-3", "to_url": _url(lab_env, 3)},
        },
        ("POST", "/v1/peer/replicas/{uuid}/failover"): {"host": 2, "params": {"uuid": uuid}},
        ("POST", "/v1/peer/replications"): {"host": 2, "body": hijack},
        ("POST", "/v1/peer/replications/{uuid}/yield"): {"host": 1, "params": {"uuid": uuid}},
        ("GET", "/v1/peer/vms/{uuid}"): {"host": 1, "params": {"uuid": uuid}},
        ("PUT", "/v1/peer/migrations/{id}/files/{file}"): {
            "host": 2,
            "params": {"id": job, "file": "kernel"},
            "data": b"not a kernel",
        },
        ("POST", "/v1/peer/migrations/{id}/launch"): {"host": 2, "params": {"id": job}},
        ("POST", "/v1/peer/migrations/{id}/finish"): {"host": 2, "params": {"id": job}},
        ("POST", "/v1/peer/migrations/{id}/abort"): {"host": 2, "params": {"id": job}},
        ("GET", "/v1/peer/migrations/{id}"): {"host": 2, "params": {"id": job}},
        ("POST", "/v1/peer/clusters/{cluster}/probe"): {
            "host": 1,
            "params": {"cluster": "c1"},
            "body": {"volume": "v", "path": "/tmp", "action": "write", "tokens": {"host-1": "x"}},
        },
    }


def _snapshot(lab_env: LabEnv) -> dict[str, Any]:
    """What a refused call must not change, on every host."""
    cli = lab_env.cli
    state: dict[str, Any] = {}
    for host in ("host-1", "host-2", "host-3"):
        state[f"{host} vms"] = sorted((v["name"], v["uuid"], v["state"], v["host"])
                                      for v in cli.json("vm", "list", "--host", host))  # fmt: skip
        jobs = cli.json("job", "list", "--host", host)
        state[f"{host} jobs"] = sorted((j["id"], j["kind"], j["state"]) for j in jobs)
    primary = cli.json("replication", "status", REPLICATED, "--host", "host-1")
    replica = cli.json("replication", "status", REPLICATED, "--host", "host-2")
    keep = ("role", "state", "primary", "replica", "thumbprint", "latest_point", "error")
    state["primary"] = {k: primary.get(k) for k in keep}
    state["replica"] = {k: replica.get(k) for k in (*keep, "points")}
    state["points"] = cli.json("replication", "points", REPLICATED, "--host", "host-1")
    return state


def test_every_peer_endpoint_refuses_a_third_host(lab_env: LabEnv,
                                                  world: dict[str, Any]) -> None:  # fmt: skip
    routes = {(r.method, r.path) for r in _peer_routes()}
    calls = _calls(world, lab_env)
    assert routes - set(OPEN_TO_ANY_HOST) == set(calls), (
        "every peer endpoint needs a row in this table (or a reason in OPEN_TO_ANY_HOST)"
    )
    before = _snapshot(lab_env)
    tls = client_ssl_context(lab_env.lab.host(3).dir / "tls")
    refusals: dict[tuple[str, str], tuple[int, str]] = {}

    async def call_all() -> None:
        for (method, template), call in sorted(calls.items()):
            target = lab_env.lab.host(call["host"])
            route = next(r for r in _peer_routes() if (r.method, r.path) == (method, template))
            url = _url(lab_env, call["host"])
            transport = HttpsTransport(target.name, url, tls, timeout=30)
            try:
                reply = await transport.request(
                    method, route.url(**call.get("params", {})), body=call.get("body"),
                    params=call.get("query"), data=call.get("data"))  # fmt: skip
            finally:
                await transport.close()
            message = ((reply.payload or {}).get("error") or {}).get("message", "")
            refusals[(method, template)] = (reply.status, message)

    asyncio.run(call_all())
    wrong = {k: v for k, v in refusals.items() if v[0] != 403 or "\n" in v[1] or not v[1]}
    assert not wrong, f"not refused with 403 and one line: {wrong}"
    assert all("host-3" in message for _, message in refusals.values()), refusals
    assert _snapshot(lab_env) == before
