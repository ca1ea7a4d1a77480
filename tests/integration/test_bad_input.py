"""Bad input gets one clear error line, a non-zero exit, and loses nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import tomli_w

from ferry.adapters import pki
from ferry.core.versions import DATA_SCHEMA_VERSION
from ferry.host.config import load_host_config
from tests.conftest import LabEnv

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def running_vm(lab_env: LabEnv) -> str:
    lab_env.cli("vm", "create", "keeper", "--host", "host-1", "--guest", "test",
                "--memory", "128M", "--disk", "16M", "--start")  # fmt: skip
    return "keeper"


def test_unknown_vm_and_host(lab_env: LabEnv) -> None:
    assert "no VM named 'ghost' on any known host" in lab_env.cli.fails("vm", "show", "ghost")
    line = lab_env.cli.fails("vm", "create", "x", "--host", "host-9", "--disk", "1M")
    assert "unknown host 'host-9'" in line
    assert "unknown host 'host-9'" in lab_env.cli.fails("host", "show", "host-9")


def test_duplicate_name_keeps_the_first_vm(lab_env: LabEnv, running_vm: str) -> None:
    before = lab_env.vm(running_vm)
    line = lab_env.cli.fails("vm", "create", running_vm, "--host", "host-1", "--disk", "1M")
    assert f"a VM named '{running_vm}' already exists on host 'host-1'" in line
    after = lab_env.vm(running_vm)
    assert after["uuid"] == before["uuid"] and after["state"] == "running"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory=-1G"], "invalid memory '-1G'"),
        (["--disk", "10XB"], "invalid disk size '10XB'"),
        (["--memory", "64T"], "more than the host has"),
        (["--cpus", "999"], "cpus 999 is out of range"),
        (["--image", "/etc/hostname"], "outside the allowed image dirs"),
        (["--guest", "windows"], "unknown guest 'windows'"),
        (["--guest", "test", "--memory", "64M"], "the test guest needs at least 96M"),
        (["--config-version", "9"], "runs configuration versions 1..3"),
    ],
)
def test_bad_create_arguments(lab_env: LabEnv, args: list[str], message: str) -> None:
    line = lab_env.cli.fails("vm", "create", "bad", "--host", "host-1", *args)
    assert message in line
    assert "no VM named 'bad'" in lab_env.cli.fails("vm", "show", "bad")
    data_dir = load_host_config(lab_env.lab.host(1).config_path).data_dir
    names = [p.name for p in (data_dir / "vms").iterdir()]
    known = {vm["uuid"] for vm in lab_env.cli.json("vm", "list", "--host", "host-1")}
    assert set(names) == known  # no half-made VM dir left behind


def test_image_path_with_dotdot_is_refused(lab_env: LabEnv) -> None:
    sneaky = f"{lab_env.lab.images_dir}/../hosts/host-1/host.toml"
    line = lab_env.cli.fails("vm", "create", "bad", "--host", "host-1", "--image", sneaky)
    assert "must not contain '..'" in line


def test_image_from_the_allowed_dir_is_copied(lab_env: LabEnv, tmp_path: Path) -> None:
    image = lab_env.lab.images_dir / "small.raw"
    image.write_bytes(b"\x5a" * 1024 * 1024)
    lab_env.cli("vm", "create", "fromimg", "--host", "host-1", "--image", str(image))
    vm = lab_env.vm("fromimg")
    assert vm["disks"][0]["size"] == 1024 * 1024 and vm["disks"][0]["format"] == "qcow2"
    assert image.exists()  # the source stays
    lab_env.cli("vm", "delete", "fromimg")


def test_state_errors_lose_nothing(lab_env: LabEnv, running_vm: str) -> None:
    line = lab_env.cli.fails("vm", "start", running_vm)
    assert f"cannot start VM '{running_vm}': it is running" in line
    line = lab_env.cli.fails("vm", "delete", running_vm)
    assert "is running: stop it first or use --force" in line
    vm = lab_env.vm(running_vm)
    assert vm["state"] == "running" and Path(vm["disks"][0]["path"]).exists()


def _host_url(lab_env: LabEnv, index: int) -> str:
    address, port = load_host_config(lab_env.lab.host(index).config_path).address
    return f"https://{address}:{port}"


async def _get(url: str, context: ssl.SSLContext) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=context, server_hostname="host-1") as response,
    ):
        return response.status, await response.text()


def test_a_peer_certificate_may_not_call_admin_endpoints(lab_env: LabEnv) -> None:
    peer = pki.client_ssl_context(lab_env.lab.host(2).dir / "tls")
    status, body = asyncio.run(_get(_host_url(lab_env, 1) + "/v1/vms", peer))
    assert status == 403 and "may only call peer endpoints" in body
    status, body = asyncio.run(_get(_host_url(lab_env, 1) + "/v1/peer/hello", peer))
    assert status == 200 and '"caller":"host-2"' in body


def test_missing_or_foreign_certificates_are_refused(lab_env: LabEnv, tmp_path: Path) -> None:
    url = _host_url(lab_env, 1) + "/v1/vms"
    no_cert = ssl.create_default_context(cafile=lab_env.lab.ca_dir / "ca-cert.pem")
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        asyncio.run(_get(url, no_cert))

    pki.create_ca(tmp_path / "evil-ca", name="evil-ca")
    pki.issue_admin_cert(tmp_path / "evil-ca", tmp_path / "evil-admin", "admin")
    foreign = pki.client_ssl_context(tmp_path / "evil-admin")
    foreign.load_verify_locations(lab_env.lab.ca_dir / "ca-cert.pem")  # trusts the server
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        asyncio.run(_get(url, foreign))

    # The CLI with the foreign certificate: one line, and it names the host.
    lab_env.cli("host", "add", "evil-view", _host_url(lab_env, 1), "--server-name", "host-1")
    home_config = (lab_env.home / "config.toml").read_text()
    try:
        lab_env.cli("host", "add", "evil-view", _host_url(lab_env, 1), "--server-name",
                    "host-1", "--admin-tls", str(tmp_path / "evil-admin"))  # fmt: skip
        line = lab_env.cli.fails("host", "show", "evil-view")
        assert "host 'evil-view'" in line
    finally:
        (lab_env.home / "config.toml").write_text(home_config)
        lab_env.cli("host", "remove", "evil-view")


def test_an_agent_refuses_a_data_dir_from_a_newer_ferry(lab_env: LabEnv, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "catalog.sqlite") as db:
        db.execute(f"PRAGMA user_version={DATA_SCHEMA_VERSION + 1}")
    pki.issue_host_cert(lab_env.lab.ca_dir, tmp_path / "tls", "host-new", ips=["127.0.0.1"])
    config = tmp_path / "host.toml"
    config.write_text(tomli_w.dumps({"name": "host-new", "listen": "127.0.0.1:1",
                                     "data_dir": str(data), "tls_dir": str(tmp_path / "tls"),
                                     "accelerator": "tcg"}))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "ferry", "agent", "--config", str(config)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"schema version {DATA_SCHEMA_VERSION + 1}" in lines[0]
    assert f"up to schema version {DATA_SCHEMA_VERSION}" in lines[0]


def test_a_second_agent_on_the_same_data_dir_is_refused(lab_env: LabEnv) -> None:
    config = lab_env.lab.host(1).config_path
    result = subprocess.run(
        [sys.executable, "-m", "ferry", "agent", "--config", str(config)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode != 0
    assert "already runs on data dir" in result.stderr
    assert lab_env.cli.json("lab", "status")["hosts"][0]["running"]
