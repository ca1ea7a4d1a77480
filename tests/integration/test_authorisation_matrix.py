"""Every API and peer endpoint against every kind of caller (issue 14, item 6; issue 11).

Four lab hosts over real mutual TLS: host-1 replicates a VM to host-2,
moved another VM to host-2, and replicates a third into cluster ``c1``
(host-3 and host-4, a replica broker). Each endpoint is called by:

- ``admin``: the lab's admin certificate;
- ``related``: the host of the same CA that the object belongs to (host-1
  for the replica on host-2, host-2 for the VM on host-1, host-3 for its
  cluster's endpoints on host-4);
- ``unrelated``: a host of the same CA with no part in the object (host-3,
  or host-1 for c1's own endpoints, host-2 for c1's replica);
- ``other_ca``: a host certificate named host-3 from another CA;
- ``no_cert``: no client certificate;
- ``expired``: an admin certificate of the lab's CA, expired yesterday;
- ``revoked_admin`` / ``revoked_host``: an admin certificate and a spare
  host-1 certificate of the lab's CA, both revoked with ``ferry pki revoke``.

The expected outcome of each cell is in the tables below: ``OK`` (authorised:
the call got past the checks of who calls, whatever it then answered, never
401/403), ``REFUSED`` (403 and one line) or ``TLS`` (cut off in the
handshake). Admin calls name objects that do not exist or carry bodies that
do not validate, so they change nothing either; refused calls name the real
objects. The related host's calls name the real objects too, and each one's
exact answer is in :data:`RELATED`: a read, or a change the object's state
turns down after the check of who calls (a finished move, a VM that still
runs, a resent point), or a body that does not validate, which the route's
guard only reaches after the caller passed. Each of those is also sent by
the unrelated host, word for word, and refused: the certificate alone makes
the difference. Afterwards the VMs, relationships, pins, recovery points and
jobs on every host are as before; then the related host removes the replica
for real, the one change it may make that nothing here turns down.

The API routes are read from the sources (every ``web.get("/...")`` and the
like under ``ferry/api`` and the agent) and the peer routes from the peer
layer's :class:`Route` objects, so an endpoint without a row here fails.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import pkgutil
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ferry
import ferry.peer
from ferry.adapters import pki
from ferry.adapters.catalog import Catalog
from ferry.adapters.pki import client_ssl_context
from ferry.errors import FerryError
from ferry.host.config import load_host_config
from ferry.peer.https import HttpsTransport
from ferry.peer.routes import NoBody, Route
from tests.conftest import LabEnv, wait

pytestmark = pytest.mark.integration

REPLICATED = "authz"
MOVED = "authz-moved"
BROKERED = "authz-brokered"  # replicated into cluster c1 (host-3, host-4)
HOSTS = ("host-1", "host-2", "host-3", "host-4")
OK, REFUSED, TLS = "ok", "refused", "tls"
NOBODY_UUID = "00000000-0000-4000-8000-000000000000"

CALLERS = ("admin", "related", "unrelated", "other_ca", "no_cert", "expired",
           "revoked_admin", "revoked_host")  # fmt: skip
# Whoever the certificate names, these never get past the handshake or the edge.
ALWAYS = {"other_ca": TLS, "no_cert": TLS, "expired": TLS,
          "revoked_admin": REFUSED, "revoked_host": REFUSED}  # fmt: skip

# Every admin API route: admin only (host certificates may only call /v1/peer/...).
API_ROUTES = [
    ("GET", "/metrics"), ("POST", "/v1/adoptions"), ("GET", "/v1/cluster"),
    ("POST", "/v1/cluster/create"), ("POST", "/v1/cluster/join"),
    ("POST", "/v1/cluster/leave"), ("POST", "/v1/clusters/{cluster}/drain"),
    ("POST", "/v1/clusters/{cluster}/resume"), ("POST", "/v1/clusters/{cluster}/upgrade-level"),
    ("POST", "/v1/clusters/{cluster}/copy-roles"),
    ("DELETE", "/v1/clusters/{cluster}/replica-server"),
    ("GET", "/v1/clusters/{cluster}/replica-server"),
    ("PUT", "/v1/clusters/{cluster}/replica-server"),
    ("POST", "/v1/clusters/{cluster}/vms"), ("DELETE", "/v1/clusters/{cluster}/vms/{vm}"),
    ("GET", "/v1/clusters/{c}"), ("GET", "/v1/clusters/{c}/events"),
    ("POST", "/v1/clusters/{c}/volumes"), ("GET", "/v1/host"),
    ("POST", "/v1/host/bandwidth-probe"), ("GET", "/v1/host/certificate"),
    ("POST", "/v1/host/certificate"), ("GET", "/v1/host/doctor"), ("GET", "/v1/host/inventory"),
    ("POST", "/v1/host/refresh-vms"), ("GET", "/v1/host/upgrade-check"), ("POST", "/v1/imports"),
    ("GET", "/v1/jobs"), ("GET", "/v1/jobs/{id}"), ("POST", "/v1/jobs/{id}/cancel"),
    ("GET", "/v1/networks"), ("POST", "/v1/networks"), ("DELETE", "/v1/networks/{name}"),
    ("DELETE", "/v1/replica-server"), ("GET", "/v1/replica-server"),
    ("PUT", "/v1/replica-server"), ("POST", "/v1/replication/import-initial"),
    ("GET", "/v1/revocations"), ("POST", "/v1/revocations"), ("GET", "/v1/vms"),
    ("POST", "/v1/vms"), ("DELETE", "/v1/vms/{name}"), ("GET", "/v1/vms/{name}"),
    ("GET", "/v1/vms/{name}/console"), ("GET", "/v1/vms/{name}/dirty-rate"),
    ("POST", "/v1/vms/{name}/export"), ("POST", "/v1/vms/{name}/failover/{action}"),
    ("POST", "/v1/vms/{name}/kill"), ("POST", "/v1/vms/{name}/move"),
    ("POST", "/v1/vms/{name}/pause"), ("POST", "/v1/vms/{name}/refresh"),
    ("DELETE", "/v1/vms/{name}/replication"), ("GET", "/v1/vms/{name}/replication"),
    ("PATCH", "/v1/vms/{name}/replication"), ("POST", "/v1/vms/{name}/replication"),
    ("DELETE", "/v1/vms/{name}/replication/extend"),
    ("POST", "/v1/vms/{name}/replication/extend"), ("POST", "/v1/vms/{name}/replication/pause"),
    ("GET", "/v1/vms/{name}/replication/points"), ("POST", "/v1/vms/{name}/replication/resume"),
    ("POST", "/v1/vms/{name}/replication/reverse"), ("POST", "/v1/vms/{name}/replication/sync"),
    ("POST", "/v1/vms/{name}/resume"), ("POST", "/v1/vms/{name}/start"),
    ("POST", "/v1/vms/{name}/stop"), ("POST", "/v1/vms/{name}/upgrade-version"),
    ("GET", "/v1/vms/{name}/vnc"), ("GET", "/v1/volumes"), ("POST", "/v1/volumes"),
    ("DELETE", "/v1/volumes/{name}"),
]  # fmt: skip
API_ROW = {"admin": OK, "related": REFUSED, "unrelated": REFUSED, **ALWAYS}

# Peer endpoints any ferry host may call, and why; every other one refuses host-3.
OPEN_TO_ANY_HOST = {
    ("GET", "/v1/peer/hello"): "says who answers and who asked, nothing about any VM",
    ("GET", "/v1/peer/replica-server/admission"): "answers for the caller itself",
    ("POST", "/v1/peer/migrations"): "any host of the CA may offer a new VM by live move",
    ("POST", "/v1/peer/migrations/check"): "asks whether this host has a VM's networks, "
    "before a move; changes nothing",
    ("PUT", "/v1/peer/probe"): "the planner's bandwidth probe: at most 256 MiB, read and "
    "dropped, nothing kept and nothing about any VM",
    ("POST", "/v1/peer/renewals"): "answers for the caller itself: only the pins of the "
    "caller's own name and presented certificate change",
}
# What each peer endpoint answers its related host here: (HTTP status, words of the
# answer). Every one changes nothing: a read, a resend, a change the object's state
# turns down after the check of who calls, or a body the guard let through to validation.
RELATED = {
    ("POST", "/v1/peer/replicas"): (201, ""),  # the offer resent: answered as the first was
    ("GET", "/v1/peer/replicas/{uuid}"): (200, ""),
    ("PATCH", "/v1/peer/replicas/{uuid}"): (400, "invalid request"),
    ("DELETE", "/v1/peer/replicas/{uuid}"): (200, ""),  # for real, after the matrix
    ("PUT", "/v1/peer/replicas/{uuid}/points/{id}"): (200, ""),  # a linked point resent
    ("GET", "/v1/peer/replicas/{uuid}/points"): (200, ""),
    ("PUT", "/v1/peer/replicas/{uuid}/files/{kind}"): (400, "unknown VM file 'no-such'"),
    ("GET", "/v1/peer/replicas/{uuid}/hashes"): (200, ""),
    ("POST", "/v1/peer/replicas/{uuid}/move"): (400, "invalid request"),
    ("POST", "/v1/peer/replicas/{uuid}/failover"): (409, "still runs on host 'host-1'"),
    ("POST", "/v1/peer/replications"): (400, "names 'host-1' as primary"),
    ("GET", "/v1/peer/broker/{cluster}/replicas/{uuid}"): (200, ""),
    ("POST", "/v1/peer/replications/{uuid}/yield"): (409, "is running on host 'host-1'"),
    ("GET", "/v1/peer/vms/{uuid}"): (200, ""),
    ("PUT", "/v1/peer/migrations/{id}/files/{file}"): (409, ""),  # the move has ended
    ("POST", "/v1/peer/migrations/{id}/launch"): (409, ""),
    ("POST", "/v1/peer/migrations/{id}/finish"): (200, ""),  # idempotent: its outcome
    ("POST", "/v1/peer/migrations/{id}/abort"): (200, ""),  # an ended move stays as it is
    ("GET", "/v1/peer/migrations/{id}"): (200, ""),
    ("POST", "/v1/peer/clusters/{cluster}/probe"): (200, ""),
    ("POST", "/v1/peer/clusters/{cluster}/copy-disks"): (404, "is not on node host-4"),
    ("GET", "/v1/peer/hello"): (200, ""),
    ("GET", "/v1/peer/replica-server/admission"): (200, ""),
    ("POST", "/v1/peer/migrations"): (400, "invalid request"),
    ("POST", "/v1/peer/migrations/check"): (400, "invalid request"),
    ("PUT", "/v1/peer/probe"): (200, ""),
    ("POST", "/v1/peer/renewals"): (400, "invalid request"),
}
# The one related call that changes its object, made for real once the matrix is done.
REAL_CHANGE = ("DELETE", "/v1/peer/replicas/{uuid}")
# Peer endpoints that refuse even an admin certificate, and why.
HOST_ONLY = {
    ("POST", "/v1/peer/migrations"): "only a host sends a VM (its QEMU streams the memory)",
    ("POST", "/v1/peer/migrations/check"): "asked by the host a VM would come from",
    ("POST", "/v1/peer/migrations/{id}/abort"): "only the host that sends the VM aborts",
    ("PUT", "/v1/peer/probe"): "measures the link from the calling host",
    ("GET", "/v1/peer/replica-server/admission"): "admits a host as a primary, by its name",
    ("POST", "/v1/peer/clusters/{cluster}/probe"): "only a node of the cluster asks",
    ("POST", "/v1/peer/clusters/{cluster}/copy-disks"): "only a node of the cluster asks "
    "(copy-roles --run asks the VM's owner)",
}
# Open peer endpoints whose answer for host-3 is itself a refusal.
REFUSES_UNRELATED = {
    ("GET", "/v1/peer/replica-server/admission"): "host-2 allows only host-1 as a primary",
}


def _peer_row(key: tuple[str, str]) -> dict[str, str]:
    open_route = key in OPEN_TO_ANY_HOST
    unrelated = OK if open_route and key not in REFUSES_UNRELATED else REFUSED
    return {"admin": REFUSED if key in HOST_ONLY else OK, "related": OK,
            "unrelated": unrelated, **ALWAYS}  # fmt: skip


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


def _api_routes_in_sources() -> set[tuple[str, str]]:
    src = Path(ferry.__file__).parent
    found: set[tuple[str, str]] = set()
    for path in [*sorted((src / "api").glob("*.py")), src / "agent.py"]:
        for match in re.finditer(r'web\.(get|post|put|patch|delete)\(\s*"(/[^"]*)"',
                                 path.read_text()):  # fmt: skip
            found.add((match.group(1).upper(), match.group(2)))
    return found


def _context(verify_ca: Path, chain: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(verify_ca / pki.CA_CERT))
    if chain is not None:
        ctx.load_cert_chain(str(chain / pki.CLIENT_CERT), str(chain / pki.CLIENT_KEY))
    return ctx


def _settled(lab_env: LabEnv) -> bool:
    view = lab_env.cli.json("cluster", "show", "c1")
    return bool(view.get("leader")) and all(n["state"] == "up" for n in view["nodes"])


@pytest.fixture(scope="module")
def world(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """host-1 replicates REPLICATED to host-2 and BROKERED to cluster c1 (host-3, host-4);
    MOVED moved from host-1 to host-2."""
    cli = lab_env.cli
    cli("lab", "up", "--hosts", "4", "--no-guest", "--cluster", "c1=host-3,host-4")
    wait("c1 to settle", lambda: _settled(lab_env), timeout=60)
    storage = tmp_path_factory.mktemp("replicas")
    cli("replica-server", "enable", "--host", "host-2", "--storage", str(storage),
        "--allow", "host-1")  # fmt: skip
    # Re-issues c1's node certificates with the cluster's name: before the callers load.
    cli("replica-server", "enable", "--cluster", "c1", "--volume", "csv1", "--allow", "host-1",
        "--ca", str(lab_env.lab.ca_dir))  # fmt: skip
    for name in (REPLICATED, MOVED, BROKERED):
        cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "96M",
            "--disk", "32M", "--start")  # fmt: skip
    for name in (REPLICATED, MOVED, BROKERED):  # slow on a loaded machine: let TCG boot
        lab_env.wait_console(name, lambda t: "seq " in t, timeout=240)
    cli("replication", "enable", REPLICATED, "--replica", "host-2", "--frequency", "15m")
    cli("replication", "enable", BROKERED, "--replica", "cluster:c1", "--frequency", "15m")
    cli("vm", "move", MOVED, "--to", "host-2")
    move = next(j for j in cli.json("job", "list", "--host", "host-2")
                if j["kind"] == "incoming" and j["vm"] == MOVED)  # fmt: skip
    catalog = Catalog(lab_env.lab.host(1).data_dir)
    try:
        rel = catalog.relationship(lab_env.vm(REPLICATED, "host-1")["uuid"])
    finally:
        catalog.close()
    assert rel is not None
    try:
        yield {"replicated": lab_env.vm(REPLICATED, "host-1"), "moved": lab_env.vm(MOVED, "host-2"),
               "brokered": lab_env.vm(BROKERED, "host-1"),
               "move_job": move["id"], "relationship": rel.model_dump(mode="json"),
               "callers": _callers(lab_env, tmp_path_factory.mktemp("callers"))}  # fmt: skip
    finally:
        for name in (REPLICATED, BROKERED):
            cli("replication", "remove", name, "--host", "host-1", check=False)
        for host in HOSTS:
            for name in (REPLICATED, MOVED, BROKERED):
                cli("vm", "delete", name, "--force", "--host", host, check=False)


def _callers(lab_env: LabEnv, root: Path) -> dict[str, ssl.SSLContext | int]:
    """Each kind of caller's TLS context (``related``: the index of the related host)."""
    lab, ca = lab_env.lab, lab_env.lab.ca_dir
    pki.create_ca(root / "other-ca", name="other-ca")
    pki.issue_host_cert(root / "other-ca", root / "other", "host-3", ips=["127.0.0.1"])
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    pki.issue_admin_cert(ca, root / "expired", "admin", not_after=yesterday)
    pki.issue_admin_cert(ca, root / "stolen-admin", "admin")
    pki.issue_host_cert(ca, root / "stolen-host", "host-1", ips=["127.0.0.1"])
    for stolen in ("stolen-admin", "stolen-host"):
        serial = pki.load_cert_info(root / stolen / pki.CLIENT_CERT).serial
        lab_env.cli("pki", "revoke", "--serial", serial, "--ca", str(ca), "--reason", "stolen")
    return {
        "admin": client_ssl_context(lab.admin_dir),
        "unrelated": client_ssl_context(lab.host(3).dir / "tls"),
        "other_ca": _context(ca, root / "other"),
        "no_cert": _context(ca, None),
        "expired": _context(ca, root / "expired"),
        "revoked_admin": client_ssl_context(root / "stolen-admin"),
        "revoked_host": client_ssl_context(root / "stolen-host"),
        **{f"host-{i}": client_ssl_context(lab.host(i).dir / "tls") for i in (1, 2, 3, 4)},
    }


def _peer_calls(world: dict[str, Any], lab_env: LabEnv) -> dict[tuple[str, str], dict[str, Any]]:
    """(method, path) -> the host asked, its related and unrelated hosts, path params and a
    body or upload that would change the object; ``as_related``: what the related host
    sends instead (it may change it; see RELATED), word for word also sent by the
    unrelated host."""
    uuid = world["replicated"]["uuid"]
    moved_uuid = world["moved"]["uuid"]
    job = world["move_job"]
    rel = dict(world["relationship"])
    spec = {"uuid": uuid, "name": REPLICATED, "config_version": 1, "memory": 96 * 1024**2}
    hijack = {**rel, "vm_uuid": moved_uuid, "vm_name": MOVED, "primary": "host-2",
              "replica": "host-3", "pending": [], "in_flight": None}  # fmt: skip
    on_replica = {"host": 2, "related": 1, "params": {"uuid": uuid}}
    on_move = {"host": 2, "related": 1, "params": {"id": job}}  # the move has ended
    invalid = {"body": []}  # the guard passes the caller first, then the body fails
    # c1's own endpoints on host-4: host-3 is its other node, host-1 no node of it. Their
    # guards check only the cluster's name; the node is checked after the body validates
    # (an etcd read), so the related host sends bodies that validate and change nothing.
    on_c1 = {"host": 4, "related": 3, "unrelated": 1, "params": {"cluster": "c1"}}
    return {
        ("POST", "/v1/peer/replicas"): {
            "host": 2, "related": 1,
            "body": {"spec": spec, "frequency_s": 30, "recovery_points": 4, "functional_level": 3},
        },
        ("GET", "/v1/peer/replicas/{uuid}"): on_replica,
        ("PATCH", "/v1/peer/replicas/{uuid}"): {**on_replica, "body": {"primary": "host-3"},
                                                "as_related": invalid},
        ("DELETE", "/v1/peer/replicas/{uuid}"): on_replica,
        ("PUT", "/v1/peer/replicas/{uuid}/points/{id}"): {
            **on_replica, "params": {"uuid": uuid, "id": "99"}, "query": {"time": "1.0"},
            "data": b"not a delta stream",
            "as_related": {"params": {"uuid": uuid, "id": "0"}},  # linked already: a resend
        },
        ("GET", "/v1/peer/replicas/{uuid}/points"): on_replica,
        ("PUT", "/v1/peer/replicas/{uuid}/files/{kind}"): {
            **on_replica, "params": {"uuid": uuid, "kind": "kernel"}, "data": b"not a kernel",
            "as_related": {"params": {"uuid": uuid, "kind": "no-such"}},
        },
        ("GET", "/v1/peer/replicas/{uuid}/hashes"): {
            **on_replica, "query": {"block_size": str(1 << 20)},
        },
        ("POST", "/v1/peer/replicas/{uuid}/move"): {
            **on_replica, "body": {"to": "host-3", "to_url": _url(lab_env, 3)},
            "as_related": invalid,
        },
        ("POST", "/v1/peer/replicas/{uuid}/failover"): on_replica,  # the VM runs on host-1
        # host-1 is the host MOVED arrived from; it may hand over, not name itself primary.
        ("POST", "/v1/peer/replications"): {"host": 2, "related": 1, "body": hijack,
                                            "as_related": {"body": {**hijack,
                                                                    "primary": "host-1"}}},
        ("GET", "/v1/peer/broker/{cluster}/replicas/{uuid}"): {
            "host": 3, "related": 1, "unrelated": 2,
            "params": {"cluster": "c1", "uuid": world["brokered"]["uuid"]},
        },
        ("POST", "/v1/peer/replications/{uuid}/yield"): {**on_replica, "host": 1, "related": 2},
        ("GET", "/v1/peer/vms/{uuid}"): {**on_replica, "host": 1, "related": 2},
        ("PUT", "/v1/peer/migrations/{id}/files/{file}"): {
            **on_move, "params": {"id": job, "file": "kernel"}, "data": b"not a kernel",
        },
        ("POST", "/v1/peer/migrations/{id}/launch"): on_move,
        ("POST", "/v1/peer/migrations/{id}/finish"): on_move,
        ("POST", "/v1/peer/migrations/{id}/abort"): on_move,
        ("GET", "/v1/peer/migrations/{id}"): on_move,
        ("POST", "/v1/peer/clusters/{cluster}/probe"): {
            **on_c1,
            "body": {"volume": "csv1", "path": "/tmp", "action": "write",
                     "tokens": {"host-4": "x"}},
            "as_related": {"body": {"volume": "csv1", "path": "/tmp", "action": "read",
                                    "tokens": {"host-4": "x"}}},  # looks, writes nothing
        },
        ("POST", "/v1/peer/clusters/{cluster}/copy-disks"): {
            **on_c1,
            "body": {"vm_uuid": NOBODY_UUID, "phase": "full", "volume_path": "/nonexistent",
                     "targets": []},
        },
        # Open to any host: called with bodies that do not validate, so nothing is offered.
        ("GET", "/v1/peer/hello"): {"host": 2, "related": 1},
        ("GET", "/v1/peer/replica-server/admission"): {"host": 2, "related": 1},
        ("POST", "/v1/peer/migrations"): {"host": 2, "related": 1, "body": []},
        ("POST", "/v1/peer/migrations/check"): {"host": 2, "related": 1, "body": []},
        ("PUT", "/v1/peer/probe"): {"host": 2, "related": 1, "data": b"x" * 1024},
        ("POST", "/v1/peer/renewals"): {"host": 2, "related": 1, "body": []},
    }  # fmt: skip


def _as_related(call: dict[str, Any]) -> dict[str, Any]:
    return {**call, **call.get("as_related", {})}


def _harmless(route: Route[Any, Any], call: dict[str, Any]) -> dict[str, Any]:
    """The admin's call: no such object, or a body that does not validate."""
    params = {p: NOBODY_UUID if p == "uuid" else "no-such" for p in route.params}
    if route.upload:
        return {**call, "params": params, "body": None, "data": b"x"}
    body = None if route.request is NoBody else []
    return {**call, "params": params, "body": body, "data": None}


def _snapshot(lab_env: LabEnv) -> dict[str, Any]:
    """What a refused call must not change, on every host."""
    cli = lab_env.cli
    state: dict[str, Any] = {}
    for host in HOSTS:
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
    brokered = cli.json("replication", "status", BROKERED, "--host", "host-1")
    state["brokered"] = {k: brokered.get(k) for k in keep}
    state["brokered points"] = cli.json("replication", "points", BROKERED, "--host", "host-1")
    return state


async def _call(transport: HttpsTransport, route_path: str, call: dict[str, Any],
                method: str) -> tuple[str | int, str, Any]:  # fmt: skip
    """(status or TLS, the error message, the payload) of one call."""
    path = re.sub(r"\{(\w+)\}", lambda m: str(call.get("params", {})[m.group(1)]), route_path)
    try:
        reply = await transport.request(
            method, path, body=call.get("body"), params=call.get("query"), data=call.get("data")
        )
    except FerryError as exc:
        return TLS, str(exc), None
    payload = reply.payload if isinstance(reply.payload, dict) else {}
    return reply.status, str((payload.get("error") or {}).get("message", "")), payload


def _verdict(outcome: str | int, message: str) -> str:
    if outcome == TLS:
        if "not JSON" in message:  # GET /metrics answers in Prometheus' text format
            return OK
        # The server's alert reaches the client as a broken connection (TLS 1.3).
        cut = ("certificate", "TLS", "disconnected", "reset by peer")
        return TLS if any(word in message for word in cut) else f"error: {message}"
    if outcome in (401, 403):
        return REFUSED if message and "\n" not in message else f"{outcome} without one line"
    return OK


def test_authorisation_matrix(lab_env: LabEnv, world: dict[str, Any]) -> None:
    peer_routes = {(r.method, r.path): r for r in _peer_routes()}
    calls = _peer_calls(world, lab_env)
    assert set(calls) == set(peer_routes), "every peer endpoint needs a row in _peer_calls"
    assert set(RELATED) == set(peer_routes), "every peer endpoint needs a row in RELATED"
    scanned = _api_routes_in_sources()
    assert len(scanned) > 50, "the route scan found too little; has the route style changed?"
    assert scanned == set(API_ROUTES), "every API endpoint needs a row in API_ROUTES"
    callers = world["callers"]
    # (caller, route, host asked, call, TLS context, expected, the unrelated host's name)
    Cell = tuple[str, tuple[str, str], int, dict[str, Any], str, str, str]
    cells: list[Cell] = []
    for key in API_ROUTES:
        params = {p: "no-such" for p in re.findall(r"\{(\w+)\}", key[1])}
        call = {"params": params, "body": [] if key[0] in ("POST", "PUT", "PATCH") else None}
        for caller, expected in API_ROW.items():
            ctx = {"related": "host-1", "unrelated": "host-3"}.get(caller, caller)
            cells.append((caller, key, 3, call, ctx, expected, "host-3"))
    for key, route in peer_routes.items():
        real = calls[key]
        stranger = f"host-{real.get('unrelated', 3)}"
        for caller, expected in _peer_row(key).items():
            call = _harmless(route, real) if caller == "admin" else real
            if caller == "unrelated" and key in OPEN_TO_ANY_HOST:
                call = _harmless(route, real) if route.request is not NoBody else real
            if caller == "related":
                if key == REAL_CHANGE:
                    continue  # made for real once the matrix is done
                call = _as_related(real)
            ctx = {"related": f"host-{real['related']}", "unrelated": stranger}.get(caller, caller)
            cells.append((caller, key, real["host"], call, ctx, expected, stranger))
        if "as_related" in real and key not in OPEN_TO_ANY_HOST:
            # The related host's very call, from the unrelated host: refused.
            cells.append(("unrelated, as related", key, real["host"], _as_related(real),
                          stranger, REFUSED, stranger))  # fmt: skip
    before = _snapshot(lab_env)
    results: dict[tuple[str, tuple[str, str]], tuple[str, str | int, str, Any]] = {}

    async def run_all() -> None:
        transports: dict[tuple[str, int], HttpsTransport] = {}
        gate = asyncio.Semaphore(8)  # a few connections at once, one session per caller

        async def one(caller: str, key: tuple[str, str], host: int, call: dict[str, Any],
                      ctx: str) -> None:  # fmt: skip
            if (ctx, host) not in transports:
                transports[ctx, host] = HttpsTransport(lab_env.lab.host(host).name,
                                                       _url(lab_env, host), callers[ctx],
                                                       timeout=120)  # fmt: skip
            async with gate:
                outcome, message, payload = await _call(transports[ctx, host], key[1], call,
                                                        key[0])  # fmt: skip
            results[caller, key] = (_verdict(outcome, message), outcome, message, payload)

        try:
            # Refused callers first, then the ones let through.
            for allowed in (False, True):
                batch = [one(caller, key, host, call, ctx)
                         for caller, key, host, call, ctx, expected, _ in cells
                         if (expected == OK) == allowed]  # fmt: skip
                await asyncio.gather(*batch)
        finally:
            for transport in transports.values():
                await transport.close()
            await asyncio.sleep(0.25)  # let TLS transports the agents closed finish closing

    asyncio.run(run_all())
    wrong = {f"{caller} {m} {p}": (results[caller, (m, p)][:3], expected)
             for caller, (m, p), _, _, _, expected, _ in cells
             if results[caller, (m, p)][0] != expected}  # fmt: skip
    assert not wrong, f"{len(wrong)} cells not as the table says: {wrong}"
    # The related host got the answer each endpoint gives after the check of who calls.
    answers = {key: results["related", key][1:3] for key in RELATED if key != REAL_CHANGE}
    off = {f"{m} {p}": got for (m, p), got in answers.items()
           if got[0] != RELATED[m, p][0] or RELATED[m, p][1] not in got[1]}  # fmt: skip
    assert not off, f"the related host's answers are not as RELATED says: {off}"
    point = results["related", ("PUT", "/v1/peer/replicas/{uuid}/points/{id}")][3]
    assert point["linked"] is False, point  # a resend: linked before, nothing new
    owner = results["related", ("GET", "/v1/peer/broker/{cluster}/replicas/{uuid}")][3]
    assert owner["node"] in ("host-3", "host-4"), owner
    # The unrelated host's refusals name it; a revoked certificate's say so.
    for caller, _key, _, _, _, _, stranger in cells:
        verdict, _, message, _ = results[caller, _key]
        if verdict == REFUSED and caller.startswith("unrelated"):
            assert repr(stranger) in message, message
        if caller.startswith("revoked"):
            assert "revoked" in message, message
    assert _snapshot(lab_env) == before
    _the_related_host_removes_the_replica(lab_env, world, calls[REAL_CHANGE])


def _the_related_host_removes_the_replica(lab_env: LabEnv, world: dict[str, Any],
                                          call: dict[str, Any]) -> None:  # fmt: skip
    """The one related call that changes its object: the primary removes its replica."""
    host = call["host"]

    async def remove() -> tuple[str | int, str, Any]:
        ctx = world["callers"][f"host-{call['related']}"]
        transport = HttpsTransport(lab_env.lab.host(host).name, _url(lab_env, host), ctx,
                                   timeout=120)  # fmt: skip
        try:
            return await _call(transport, REAL_CHANGE[1], call, REAL_CHANGE[0])
        finally:
            await transport.close()
            await asyncio.sleep(0.25)

    status, message, payload = asyncio.run(remove())
    assert (status, message) == (RELATED[REAL_CHANGE][0], ""), (status, message)
    assert payload == {"vm": REPLICATED, "kept_replica_vm": True}, payload
    gone = lab_env.cli("replication", "status", REPLICATED, "--host", "host-2", check=False)
    assert gone.returncode != 0, gone.stdout
    # The replica VM stays there as an ordinary VM, off, on its latest point.
    assert lab_env.vm(REPLICATED, "host-2")["state"] == "off"
