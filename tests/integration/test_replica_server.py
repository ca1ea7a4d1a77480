"""Replica server settings through the CLI and a real agent; admission by peer certificate."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ferry.adapters import pki
from ferry.host.config import load_host_config
from tests.conftest import LabEnv

pytestmark = pytest.mark.integration


async def _admission(url: str, context: ssl.SSLContext) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            url + "/v1/peer/replica-server/admission", ssl=context, server_hostname="host-2"
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


def _host2(lab_env: LabEnv) -> str:
    address, port = load_host_config(lab_env.lab.host(2).config_path).address
    return f"https://{address}:{port}"


def test_admission_follows_the_settings(lab_env: LabEnv, tmp_path: Path) -> None:
    cli = lab_env.cli
    url = _host2(lab_env)
    as_host1 = pki.client_ssl_context(lab_env.lab.host(1).dir / "tls")
    pki.issue_host_cert(lab_env.lab.ca_dir, tmp_path / "h9", "host-9", ips=["127.0.0.1"])
    as_host9 = pki.client_ssl_context(tmp_path / "h9")

    status, body = asyncio.run(_admission(url, as_host1))
    assert status == 403 and "host 'host-2' is not a replica server" in body["error"]["message"]

    storage, edge = tmp_path / "replicas", tmp_path / "edge"
    cli("replica-server", "enable", "--host", "host-2", "--storage", str(storage),
        "--allow", "host-1", "--trust-group", "dc1", "--allow", "host-9*", "--storage",
        str(edge))  # fmt: skip
    assert storage.is_dir() and edge.is_dir()
    status, body = asyncio.run(_admission(url, as_host1))
    assert status == 200 and body == {"storage": str(storage), "trust_group": "dc1",
                                      "rule": "host-1"}  # fmt: skip
    status, body = asyncio.run(_admission(url, as_host9))
    assert status == 200 and body["storage"] == str(edge)

    cli("replica-server", "enable", "--host", "host-2", "--storage", str(storage),
        "--allow", "host-1")  # fmt: skip
    status, body = asyncio.run(_admission(url, as_host9))
    assert status == 403 and "does not accept replication from 'host-9'" in body["error"]["message"]

    # An admin certificate is no primary.
    status, body = asyncio.run(_admission(url, pki.client_ssl_context(lab_env.lab.admin_dir)))
    assert status == 403

    # The settings live in the catalog: an agent restart keeps them.
    lab_env.restart_agent(2)
    shown = cli.json("replica-server", "show", "--host", "host-2")
    assert shown["enabled"] and shown["allow"] == [
        {"pattern": "host-1", "storage": None, "trust_group": None}]  # fmt: skip

    cli("replica-server", "disable", "--host", "host-2")
    status, _ = asyncio.run(_admission(url, as_host1))
    assert status == 403
    assert not cli.json("replica-server", "show", "--host", "host-2")["enabled"]


def test_bad_settings_are_refused_and_nothing_changes(lab_env: LabEnv, tmp_path: Path) -> None:
    cli = lab_env.cli
    before = cli.json("replica-server", "show", "--host", "host-2")
    for args, message in [
        (["--allow", "host-1"], "needs --storage DIR"),
        (["--storage", str(tmp_path / "r")], "must accept someone"),
        (["--storage", "relative", "--allow-any"], "must be absolute"),
        (["--storage", "/nonexistent/dir/r", "--allow-any"], "its parent does not exist"),
        (["--storage", str(tmp_path / "r"), "--allow", "Bad Pattern"], "not a host name pattern"),
        (["--storage", str(tmp_path / "r"), "--trust-group", "g"], "belongs to an --allow"),
    ]:
        line = cli.fails("replica-server", "enable", "--host", "host-2", *args)
        assert message in line, (args, line)
    assert cli.json("replica-server", "show", "--host", "host-2") == before
