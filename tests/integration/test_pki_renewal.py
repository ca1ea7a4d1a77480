"""``ferry pki renew`` rotates a host's certificate in place; ``ferry pki revoke`` bites at once.

Real agents over real mutual TLS, a small test guest replicating from host-1
to host-2. Renewing host-1's certificate restarts nothing (same agent pid,
same QEMU pid, the VM runs on), host-2 learns the new thumbprint over the old
channel and pins it, the next replication cycle succeeds with the new
certificate, and the old certificate (revoked by the renewal) is refused by
host-2. A revoked admin certificate loses its open keep-alive connection and
every new request, and the deny-list survives an agent restart.
"""

from __future__ import annotations

import asyncio
import http.client
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.adapters import pki
from ferry.adapters.pki import client_ssl_context, load_cert_info
from ferry.host.config import load_host_config
from ferry.peer.https import HttpsTransport
from tests.conftest import LabEnv

pytestmark = pytest.mark.integration

VM = "renewed"


def _address(lab_env: LabEnv, index: int) -> tuple[str, int]:
    return load_host_config(lab_env.lab.host(index).config_path).address


def _call(lab_env: LabEnv, index: int, tls_dir: Path, path: str) -> tuple[int, Any, str | None]:
    """(status, payload, server thumbprint) of GET ``path`` on host-``index`` with ``tls_dir``."""
    address, port = _address(lab_env, index)
    name = lab_env.lab.host(index).name

    async def go() -> tuple[int, Any, str | None]:
        transport = HttpsTransport(name, f"https://{address}:{port}",
                                   client_ssl_context(tls_dir), timeout=30)  # fmt: skip
        try:
            reply = await transport.request("GET", path)
        finally:
            await transport.close()
            await asyncio.sleep(0.25)  # let TLS transports the agent closed finish closing
        return reply.status, reply.payload, reply.thumbprint

    return asyncio.run(go())


@pytest.fixture(scope="module")
def world(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    cli = lab_env.cli
    storage = tmp_path_factory.mktemp("replicas")
    cli("replica-server", "enable", "--host", "host-2", "--storage", str(storage),
        "--allow", "host-1")  # fmt: skip
    cli("vm", "create", VM, "--host", "host-1", "--guest", "test", "--memory", "96M",
        "--disk", "32M", "--start")  # fmt: skip
    lab_env.wait_console(VM, lambda t: "seq " in t, timeout=240)  # slow under load
    cli("replication", "enable", VM, "--replica", "host-2", "--frequency", "15m")
    try:
        yield {"ca": str(lab_env.lab.ca_dir), "tmp": tmp_path_factory.mktemp("certs")}
    finally:
        cli("replication", "remove", VM, "--host", "host-1", check=False)
        for host in ("host-1", "host-2"):
            cli("vm", "delete", VM, "--force", "--host", host, check=False)


def test_renew_keeps_vms_running_and_pins_follow(lab_env: LabEnv,
                                                 world: dict[str, Any]) -> None:  # fmt: skip
    cli, host1 = lab_env.cli, lab_env.lab.host(1)
    tls = host1.dir / "tls"
    old_dir = world["tmp"] / "host-1-old"
    shutil.copytree(tls, old_dir)
    old = load_cert_info(tls / pki.SERVER_CERT)
    agent_pid, qemu_pid = host1.pid(), lab_env.vm(VM, "host-1")["pid"]
    replica = cli.json("replication", "status", VM, "--host", "host-2")
    assert replica["thumbprint"] == old.thumbprint  # host-2 pins host-1's certificate

    done = cli.json("pki", "renew", "--host", "host-1", "--ca", world["ca"], "--json")

    new = load_cert_info(tls / pki.SERVER_CERT)
    assert done["old"]["thumbprint"] == old.thumbprint != new.thumbprint
    assert done["new"]["thumbprint"] == new.thumbprint
    assert load_cert_info(tls / pki.CLIENT_CERT).thumbprint == new.thumbprint
    assert (new.common_name, new.dns_names, new.ips) == (old.common_name, old.dns_names, old.ips)
    assert done["partners"] == [{"host": "host-2", "pins_updated": 1, "error": None}]
    assert done["old_revoked_on"] == {"host-1": None, "host-2": None}
    # Nothing restarted: the same agent and QEMU, the VM still running.
    view = lab_env.vm(VM, "host-1")
    assert (host1.pid(), view["pid"], view["state"]) == (agent_pid, qemu_pid, "running")
    # The agent presents the new certificate on new connections, to admins and peers.
    status, _, presented = _call(lab_env, 1, lab_env.lab.admin_dir, "/v1/host")
    assert (status, presented) == (200, new.thumbprint)
    # host-2 pins the new thumbprint, and the next cycle runs with the new certificate.
    assert cli.json("replication", "status", VM, "--host", "host-2")["thumbprint"] == new.thumbprint
    outcome = cli.json("replication", "sync", VM)
    assert outcome["result"] == "ok", outcome
    status = cli.json("replication", "status", VM, "--host", "host-1")
    assert status["state"] == "replicating" and not status.get("error"), status
    assert cli.json("replication", "status", VM, "--host", "host-2")["thumbprint"] == new.thumbprint
    # The old certificate is revoked: host-2 refuses it even where any host may call.
    status, payload, _ = _call(lab_env, 2, old_dir, "/v1/peer/hello")
    assert status == 403 and "revoked" in payload["error"]["message"], payload
    listed = cli.json("pki", "revocations", "--ca", world["ca"], "--json")["revoked"]
    assert [e["serial"] for e in listed if e["host"] == "host-1"] == [old.serial]
    assert lab_env.vm(VM, "host-1")["pid"] == qemu_pid


def test_revoked_admin_loses_its_connection(lab_env: LabEnv, world: dict[str, Any]) -> None:
    cli = lab_env.cli
    spare = world["tmp"] / "spare-admin"
    info = pki.issue_admin_cert(lab_env.lab.ca_dir, spare, "spare")
    address, port = _address(lab_env, 2)
    ctx = client_ssl_context(spare)
    conn = http.client.HTTPSConnection(address, port, context=ctx, timeout=30)
    # One keep-alive connection; the agent's certificate names the host, not the address.
    conn.sock = ctx.wrap_socket(socket.create_connection((address, port)),
                                server_hostname="host-2")  # fmt: skip
    try:
        conn.request("GET", "/v1/host")
        response = conn.getresponse()
        assert response.status == 200
        response.read()
        assert "--host HOST or --serial" in cli.fails("pki", "revoke", "--ca", world["ca"])
        cli("pki", "revoke", "--serial", info.serial, "--ca", world["ca"], "--reason", "lost")
        # The keep-alive connection opened before the revocation is gone.
        with pytest.raises((http.client.HTTPException, ConnectionError, ssl.SSLError, OSError)):
            conn.request("GET", "/v1/host")
            conn.getresponse().read()
    finally:
        conn.close()
    for index in (1, 2):
        status, payload, _ = _call(lab_env, index, spare, "/v1/vms")
        assert status == 403 and "revoked" in payload["error"]["message"], payload
    # The list lives in the agent's data dir: a restarted agent still refuses it.
    lab_env.restart_agent(2)
    status, payload, _ = _call(lab_env, 2, spare, "/v1/vms")
    assert status == 403 and "revoked" in payload["error"]["message"], payload
    assert _call(lab_env, 2, lab_env.lab.admin_dir, "/v1/vms")[0] == 200
    listed = cli.json("pki", "revocations", "--ca", world["ca"], "--json")["revoked"]
    assert {"serial": info.serial, "reason": "lost"}.items() <= next(
        e for e in listed if e["serial"] == info.serial
    ).items()
