"""The graphical console for real: a VNC display on a unix socket, through a move and the relay."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.adapters.pki import client_ssl_context
from ferry.errors import ConnectionFailedError
from ferry.host.config import load_host_config
from ferry.host.vms.process import short_name
from ferry.peer.https import HttpsTransport
from tests.conftest import LabEnv, seqs

pytestmark = pytest.mark.integration

BANNER = b"RFB 003.008\n"


def vnc_socket(env: LabEnv, index: int, uuid: str) -> Path:
    """Where host-``index``'s QEMU of VM ``uuid`` serves its display."""
    config = load_host_config(env.lab.host(index).config_path)
    return config.runtime_dir / f"{short_name(uuid)}.vnc"


def read_banner(sock: socket.socket, timeout: float = 20) -> bytes:
    sock.settimeout(timeout)
    got = b""
    while len(got) < len(BANNER):
        chunk = sock.recv(len(BANNER) - len(got))
        if not chunk:
            break
        got += chunk
    return got


def unix_banner(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        return read_banner(sock)


def test_a_vnc_display_speaks_rfb_and_survives_a_move(lab_env: LabEnv) -> None:
    lab_env.cli("vm", "create", "painter", "--host", "host-1", "--guest", "test", "--memory",
                "128M", "--volume", "shared", "--display", "vnc", "--start")  # fmt: skip
    vm = lab_env.vm("painter")
    assert vm["vnc"] is True and vm["display"] == "vnc"
    before = vnc_socket(lab_env, 1, vm["uuid"])
    assert unix_banner(before) == BANNER
    lab_env.cli("vm", "move", "painter", "--to", "host-2")
    moved = lab_env.vm("painter")
    assert moved["host"] == "host-2" and moved["vnc"] is True
    assert not before.exists()  # the source's QEMU and its socket are gone
    assert unix_banner(vnc_socket(lab_env, 2, vm["uuid"])) == BANNER
    # The guest runs on (its boot under TCG on a loaded 2-core machine can take a minute).
    lab_env.wait_console("painter", lambda t: len(seqs(t)) >= 2, timeout=180)
    plain = lab_env.cli.json("vm", "create", "blind", "--host", "host-1", "--memory", "64M")
    assert plain["vnc"] is False and plain["display"] == "none"
    lab_env.cli("vm", "delete", "blind")


@contextlib.contextmanager
def vnc_forward(env: LabEnv, name: str) -> Iterator[tuple[str, int]]:
    """``ferry vm vnc NAME`` as its own process: its (address, port); SIGINT at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferry", "vm", "vnc", name, "--listen", "127.0.0.1:0"],
        env=dict(os.environ, FERRY_HOME=str(env.home)), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        match = re.fullmatch(r"vnc://(127\.0\.0\.1):(\d+)", line)
        assert match, f"ferry vm vnc printed {line!r}; stderr: {proc.stderr and proc.stderr.read()}"
        yield match[1], int(match[2])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


def tcp_banner(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=20) as sock:
        return read_banner(sock)


def host_certificate_refused(env: LabEnv, name: str) -> bool:
    """The VM's agent refuses its display to the other lab host's (peer) certificate."""
    index = int(env.vm(name)["host"].rsplit("-", 1)[1])
    other = 3 - index
    config = load_host_config(env.lab.host(index).config_path)
    address, port = config.address
    tls = client_ssl_context(env.lab.host(other).dir / "tls")
    transport = HttpsTransport(f"host-{index}", f"https://{address}:{port}", tls, timeout=30)

    async def attempt() -> str:
        try:
            async with transport.websocket(f"/v1/vms/{name}/vnc"):
                return "opened"
        except ConnectionFailedError as exc:
            return exc.message
        finally:
            await transport.close()

    outcome = asyncio.run(attempt())
    assert outcome.endswith("HTTP 403"), outcome
    return True


def test_ferry_vm_vnc_relays_the_display_over_the_agents_api(lab_env: LabEnv) -> None:
    if lab_env.vm("painter")["state"] != "running":
        lab_env.cli("vm", "start", "painter")
    with vnc_forward(lab_env, "painter") as address:
        assert tcp_banner(address) == BANNER
        assert tcp_banner(address) == BANNER  # one websocket per viewer connection
        # The forward finds the VM where it went: a viewer reconnects after a move.
        there = lab_env.vm("painter")["host"]
        lab_env.cli("vm", "move", "painter", "--to", "host-1" if there == "host-2" else "host-2")
        assert tcp_banner(address) == BANNER
    assert host_certificate_refused(lab_env, "painter")
    lab_env.cli("vm", "create", "blind", "--host", "host-1", "--memory", "64M")
    line = lab_env.cli.fails("vm", "vnc", "blind")
    assert "has no VNC display" in line
    line = lab_env.cli.fails("vm", "vnc", "painter", "--listen", "0.0.0.0:5900")
    assert line.startswith("ferry: error: --listen")  # never a wildcard, loopback only
    lab_env.cli("vm", "delete", "blind")
    lab_env.cli("vm", "kill", "painter")
    lab_env.cli("vm", "delete", "painter")
