"""The graphical console for real: a VNC display on a unix socket, through a move and the relay."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ferry.host.config import load_host_config
from ferry.host.vms.process import short_name
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
    lab_env.wait_console("painter", lambda t: len(seqs(t)) >= 2)
    plain = lab_env.cli.json("vm", "create", "blind", "--host", "host-1", "--memory", "64M")
    assert plain["vnc"] is False and plain["display"] == "none"
    lab_env.cli("vm", "delete", "blind")
