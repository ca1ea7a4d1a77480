"""Every API and peer endpoint against every kind of caller (issue 14, item 6; issue 11).

Three lab hosts over real mutual TLS: host-1 replicates a VM to host-2 and
moved another VM to host-2; host-3 is related to neither. Each endpoint is
called by:

- ``admin``: the lab's admin certificate;
- ``related``: the host of the same CA that the object belongs to (host-1
  for the replica on host-2, host-2 for the VM on host-1);
- ``unrelated``: host-3, of the same CA;
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
objects. Afterwards the VMs, relationships, pins, recovery points and jobs
on every host are as before.

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
from tests.conftest import LabEnv

pytestmark = pytest.mark.integration

REPLICATED = "authz"
MOVED = "authz-moved"
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
# Peer endpoints the related host is asked here (they change nothing); the others change
# the object and run as the partner in the replication, failover and migration tests.
RELATED_READS = {
    ("GET", "/v1/peer/replicas/{uuid}"), ("GET", "/v1/peer/replicas/{uuid}/points"),
    ("GET", "/v1/peer/replicas/{uuid}/hashes"), ("GET", "/v1/peer/vms/{uuid}"),
    ("GET", "/v1/peer/migrations/{id}"),
}  # fmt: skip
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


def _peer_row(key: tuple[str, str]) -> dict[str, str | None]:
    open_route = key in OPEN_TO_ANY_HOST
    related = OK if key in RELATED_READS or open_route else None
    unrelated = OK if open_route and key not in REFUSES_UNRELATED else REFUSED
    return {"admin": REFUSED if key in HOST_ONLY else OK, "related": related,
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
    for name in (REPLICATED, MOVED):  # slow on a loaded machine: let TCG boot
        lab_env.wait_console(name, lambda t: "seq " in t, timeout=240)
    cli("replication", "enable", REPLICATED, "--replica", "host-2", "--frequency", "15m")
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
               "move_job": move["id"], "relationship": rel.model_dump(mode="json"),
               "callers": _callers(lab_env, tmp_path_factory.mktemp("callers"))}  # fmt: skip
    finally:
        cli("replication", "remove", REPLICATED, "--host", "host-1", check=False)
        for host in ("host-1", "host-2", "host-3"):
            for name in (REPLICATED, MOVED):
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
        "host-1": client_ssl_context(lab.host(1).dir / "tls"),
        "host-2": client_ssl_context(lab.host(2).dir / "tls"),
    }


def _peer_calls(world: dict[str, Any], lab_env: LabEnv) -> dict[tuple[str, str], dict[str, Any]]:
    """(method, path) -> the host asked, the related host, path params, a valid body/upload."""
    uuid = world["replicated"]["uuid"]
    moved_uuid = world["moved"]["uuid"]
    job = world["move_job"]
    rel = dict(world["relationship"])
    spec = {"uuid": uuid, "name": REPLICATED, "config_version": 1, "memory": 96 * 1024**2}
    hijack = {**rel, "vm_uuid": moved_uuid, "vm_name": MOVED, "primary": "host-2",
              "replica": "host-3", "pending": [], "in_flight": None}  # fmt: skip
    on_replica = {"host": 2, "related": 1, "params": {"uuid": uuid}}
    return {
        ("POST", "/v1/peer/replicas"): {
            "host": 2, "related": 1,
            "body": {"spec": spec, "frequency_s": 30, "recovery_points": 4, "functional_level": 3},
        },
        ("GET", "/v1/peer/replicas/{uuid}"): on_replica,
        ("PATCH", "/v1/peer/replicas/{uuid}"): {**on_replica, "body": {"primary": "host-3"}},
        ("DELETE", "/v1/peer/replicas/{uuid}"): on_replica,
        ("PUT", "/v1/peer/replicas/{uuid}/points/{id}"): {
            **on_replica, "params": {"uuid": uuid, "id": "99"}, "query": {"time": "1.0"},
            "data": b"not a delta stream",
        },
        ("GET", "/v1/peer/replicas/{uuid}/points"): on_replica,
        ("PUT", "/v1/peer/replicas/{uuid}/files/{kind}"): {
            **on_replica, "params": {"uuid": uuid, "kind": "kernel"}, "data": b"not a kernel",
        },
        ("GET", "/v1/peer/replicas/{uuid}/hashes"): {
            **on_replica, "query": {"block_size": str(1 << 20)},
        },
        ("POST", "/v1/peer/replicas/{uuid}/move"): {
            **on_replica, "body": {"to": "host-3", "to_url": _url(lab_env, 3)},
        },
        ("POST", "/v1/peer/replicas/{uuid}/failover"): on_replica,
        ("POST", "/v1/peer/replications"): {"host": 2, "related": 1, "body": hijack},
        ("GET", "/v1/peer/broker/{cluster}/replicas/{uuid}"): {
            "host": 2, "related": 1, "params": {"cluster": "c1", "uuid": uuid},
        },
        ("POST", "/v1/peer/replications/{uuid}/yield"): {**on_replica, "host": 1, "related": 2},
        ("GET", "/v1/peer/vms/{uuid}"): {**on_replica, "host": 1, "related": 2},
        ("PUT", "/v1/peer/migrations/{id}/files/{file}"): {
            "host": 2, "related": 1, "params": {"id": job, "file": "kernel"},
            "data": b"not a kernel",
        },
        ("POST", "/v1/peer/migrations/{id}/launch"): {"host": 2, "related": 1,
                                                      "params": {"id": job}},
        ("POST", "/v1/peer/migrations/{id}/finish"): {"host": 2, "related": 1,
                                                      "params": {"id": job}},
        ("POST", "/v1/peer/migrations/{id}/abort"): {"host": 2, "related": 1,
                                                     "params": {"id": job}},
        ("GET", "/v1/peer/migrations/{id}"): {"host": 2, "related": 1, "params": {"id": job}},
        ("POST", "/v1/peer/clusters/{cluster}/probe"): {
            "host": 1, "related": 2, "params": {"cluster": "c1"},
            "body": {"volume": "v", "path": "/tmp", "action": "write", "tokens": {"host-1": "x"}},
        },
        ("POST", "/v1/peer/clusters/{cluster}/copy-disks"): {
            "host": 1, "related": 2, "params": {"cluster": "c1"},
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


async def _call(transport: HttpsTransport, route_path: str, call: dict[str, Any],
                method: str) -> tuple[str | int, str]:  # fmt: skip
    """(status or TLS, the error message) of one call."""
    path = re.sub(r"\{(\w+)\}", lambda m: str(call.get("params", {})[m.group(1)]), route_path)
    try:
        reply = await transport.request(
            method, path, body=call.get("body"), params=call.get("query"), data=call.get("data")
        )
    except FerryError as exc:
        return TLS, str(exc)
    payload = reply.payload if isinstance(reply.payload, dict) else {}
    return reply.status, str((payload.get("error") or {}).get("message", ""))


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
    scanned = _api_routes_in_sources()
    assert len(scanned) > 50, "the route scan found too little; has the route style changed?"
    assert scanned == set(API_ROUTES), "every API endpoint needs a row in API_ROUTES"
    callers = world["callers"]
    cells: list[tuple[str, tuple[str, str], int, dict[str, Any], str, str | None]] = []
    for key in API_ROUTES:
        params = {p: "no-such" for p in re.findall(r"\{(\w+)\}", key[1])}
        call = {"params": params, "body": [] if key[0] in ("POST", "PUT", "PATCH") else None}
        for caller, expected in API_ROW.items():
            cells.append((caller, key, 3, call, "host-1" if caller == "related" else caller,
                          expected))  # fmt: skip
    for key, route in peer_routes.items():
        real = calls[key]
        for caller, expected in _peer_row(key).items():
            call = _harmless(route, real) if caller == "admin" else real
            if caller == "unrelated" and key in OPEN_TO_ANY_HOST:
                call = _harmless(route, real) if route.request is not NoBody else real
            ctx = f"host-{real['related']}" if caller == "related" else caller
            cells.append((caller, key, real["host"], call, ctx, expected))
    before = _snapshot(lab_env)
    results: dict[tuple[str, tuple[str, str]], tuple[str, str | int, str]] = {}

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
                outcome, message = await _call(transports[ctx, host], key[1], call, key[0])
            results[caller, key] = (_verdict(outcome, message), outcome, message)

        try:
            # Refused callers first, then the ones let through (on objects that do not exist).
            for allowed in (False, True):
                batch = [one(caller, key, host, call, ctx)
                         for caller, key, host, call, ctx, expected in cells
                         if expected is not None and (expected == OK) == allowed]  # fmt: skip
                await asyncio.gather(*batch)
        finally:
            for transport in transports.values():
                await transport.close()
            await asyncio.sleep(0.25)  # let TLS transports the agents closed finish closing

    asyncio.run(run_all())
    wrong = {f"{caller} {m} {p}": (results[caller, (m, p)], expected)
             for caller, (m, p), _, _, _, expected in cells
             if expected is not None and results[caller, (m, p)][0] != expected}  # fmt: skip
    assert not wrong, f"{len(wrong)} cells not as the table says: {wrong}"
    # host-3's refusals name it; a revoked certificate's say so.
    for (caller, _key), (verdict, _, message) in results.items():
        if verdict == REFUSED and caller == "unrelated":
            assert "host-3" in message, message
        if caller.startswith("revoked"):
            assert "revoked" in message, message
    assert _snapshot(lab_env) == before
