"""Moves across functional levels, and who may send a VM to a host."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from ferry.adapters import pki
from ferry.host.config import load_host_config
from tests.conftest import LabEnv, qemu_pids_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mixed_lab(lab_env: LabEnv) -> Iterator[LabEnv]:
    """host-2 runs at functional level 2 (an older host), host-1 at 3."""
    lab_env.restart_agent(2, functional_level=2)
    assert lab_env.cli.json("host", "show", "host-2")["functional_level"] == 2
    yield lab_env


def test_a_newer_vm_is_refused_by_an_older_host(mixed_lab: LabEnv) -> None:
    cli = mixed_lab.cli
    cli("vm", "create", "modern", "--host", "host-1", "--guest", "test", "--memory", "128M",
        "--disk", "16M", "--start")  # fmt: skip
    vm = mixed_lab.vm("modern")
    line = cli.fails("vm", "move", "modern", "--to", "host-2")
    assert "host 'host-2' runs configuration versions 1..2" in line
    assert "VM 'modern' has configuration version 3" in line
    after = mixed_lab.vm("modern")
    assert after["host"] == "host-1" and after["state"] == "running" and after["pid"] == vm["pid"]
    assert qemu_pids_for(vm["uuid"]) == [vm["pid"]]
    cli("vm", "delete", "modern", "--force")


def test_an_older_vm_moves_up_and_keeps_its_version_until_upgraded(mixed_lab: LabEnv) -> None:
    cli = mixed_lab.cli
    cli("vm", "create", "legacy", "--host", "host-2", "--guest", "test", "--memory", "128M",
        "--disk", "16M", "--start")  # fmt: skip
    assert mixed_lab.vm("legacy")["config_version"] == 2
    mixed_lab.wait_console("legacy", lambda t: "seq 2" in t)
    cli("vm", "move", "legacy", "--to", "host-1")
    moved = mixed_lab.vm("legacy")
    assert moved["host"] == "host-1" and moved["config_version"] == 2
    argv = Path(f"/proc/{moved['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"pc-q35-7.1,accel=tcg" in argv  # the pinned machine type came along

    line = cli.fails("vm", "upgrade-version", "legacy")
    assert "changes its machine type (pc-q35-7.1 -> pc-q35-7.2)" in line
    assert "stop it first" in line
    cli("vm", "stop", "legacy", "--timeout", "20s")
    assert cli.json("vm", "upgrade-version", "legacy")["config_version"] == 3
    assert "already has configuration version 3" in cli.fails("vm", "upgrade-version", "legacy")
    cli("vm", "start", "legacy")
    mixed_lab.wait_console("legacy", lambda t: "ferry-guest up" in t)
    # Now too new to go back.
    assert "runs configuration versions 1..2" in cli.fails("vm", "move", "legacy", "--to", "host-2")
    cli("vm", "delete", "legacy", "--force")


def _url(env: LabEnv, index: int) -> str:
    address, port = load_host_config(env.lab.host(index).config_path).address
    return f"https://{address}:{port}"


async def _post(url: str, context: object, body: dict[str, object]) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, ssl=context, server_hostname="host-2") as response,
    ):
        return response.status, await response.text()


def test_only_a_host_of_the_same_ca_may_send_a_vm(mixed_lab: LabEnv, tmp_path: Path) -> None:
    url = _url(mixed_lab, 2) + "/v1/peer/migrations"
    body = {"job_id": "x", "spec": {}, "storage": "auto", "disk_volumes": []}
    admin = pki.client_ssl_context(mixed_lab.lab.admin_dir)
    status, text = asyncio.run(_post(url, admin, body))
    assert status == 403 and "only a ferry host may send a VM here" in text

    pki.create_ca(tmp_path / "ca", name="other-ca")
    pki.issue_host_cert(tmp_path / "ca", tmp_path / "host", "host-1", ips=["127.0.0.1"])
    impostor = pki.client_ssl_context(tmp_path / "host")
    impostor.load_verify_locations(mixed_lab.lab.ca_dir / "ca-cert.pem")
    with pytest.raises((aiohttp.ClientError, ConnectionError, OSError)):
        asyncio.run(_post(url, impostor, body))
    assert mixed_lab.cli.json("vm", "list", "--host", "host-2") == []
