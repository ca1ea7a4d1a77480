"""Moves that must fail safely (disk full, TLS refused) and moves that must wait (queue)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.adapters import pki
from ferry.host.config import load_host_config
from tests.conftest import LabEnv, qemu_pids_for

pytestmark = pytest.mark.integration


@pytest.fixture
def small_destination(lab_env: LabEnv) -> Iterator[Path]:
    """host-2's VM dir on a 16 MiB tmpfs, unmounted afterwards whatever happens."""
    vms = load_host_config(lab_env.lab.host(2).config_path).data_dir / "vms"
    vms.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "ferry-test", str(vms)], check=True)
    try:
        yield vms
    finally:
        subprocess.run(["umount", "-l", str(vms)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_on_the_destination(lab_env: LabEnv, small_destination: Path) -> None:
    image = lab_env.lab.images_dir / "full.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "128M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x6b 1M 48M", str(image)], check=True,
                   capture_output=True)  # fmt: skip
    lab_env.cli("vm", "create", "bulky", "--host", "host-1", "--guest", "test", "--memory",
                "128M", "--image", str(image), "--start")  # fmt: skip
    lab_env.wait_console("bulky", lambda t: "seq 2\n" in t)
    before = lab_env.vm("bulky")

    line = lab_env.cli.fails("vm", "move", "bulky", "--to", "host-2", "--storage", "copy")
    assert "move of VM bulky to host-2 failed" in line

    after = lab_env.vm("bulky")
    assert after["host"] == "host-1" and after["state"] == "running"
    assert after["pid"] == before["pid"]
    assert qemu_pids_for(before["uuid"]) == [before["pid"]]
    assert lab_env.cli.json("vm", "list", "--host", "host-2") == []
    assert list(small_destination.iterdir()) == []  # no half disk left behind
    count = lab_env.console("bulky").count("seq ")
    lab_env.wait_console("bulky", lambda t: t.count("seq ") > count + 1)
    lab_env.cli("vm", "delete", "bulky", "--force")


def test_a_memory_stream_from_the_wrong_host_is_refused_by_qemu(lab_env: LabEnv) -> None:
    """The agent call is host-1's, but its QEMU shows another host's certificate."""
    tls = lab_env.lab.host(1).dir / "tls"
    saved = {name: (tls / name).read_bytes() for name in ("client-cert.pem", "client-key.pem")}
    other = lab_env.lab.root / "other-tls"
    pki.issue_host_cert(lab_env.lab.ca_dir, other, "host-9", ips=["127.0.0.1"])
    lab_env.cli("vm", "create", "guarded", "--host", "host-1", "--guest", "test", "--memory",
                "128M", "--disk", "16M", "--start")  # fmt: skip
    before = lab_env.vm("guarded")
    try:
        for name in saved:
            (tls / name).write_bytes((other / name).read_bytes())
        line = lab_env.cli.fails("vm", "move", "guarded", "--to", "host-2")
        assert "move of VM guarded to host-2 failed" in line
    finally:
        for name, data in saved.items():
            (tls / name).write_bytes(data)
    after = lab_env.vm("guarded")
    assert after["host"] == "host-1" and after["state"] == "running"
    assert qemu_pids_for(before["uuid"]) == [before["pid"]]
    assert lab_env.cli.json("vm", "list", "--host", "host-2") == []
    lab_env.cli("vm", "move", "guarded", "--to", "host-2")  # the right certificate: it moves
    assert lab_env.vm("guarded")["host"] == "host-2"
    lab_env.cli("vm", "delete", "guarded", "--force")


def test_moves_beyond_the_host_limit_wait_in_a_queue(lab_env: LabEnv) -> None:
    lab_env.restart_agent(1, max_live_migrations=1)
    env = dict(os.environ, FERRY_HOME=str(lab_env.home))
    moves = []
    try:
        for name in ("first", "second"):
            lab_env.cli("vm", "create", name, "--host", "host-1", "--guest", "test",
                        "--memory", "128M", "--disk", "16M", "--start")  # fmt: skip
        for name in ("first", "second"):
            moves.append(subprocess.Popen(
                [sys.executable, "-m", "ferry", "vm", "move", name, "--to", "host-2",
                 "--max-bandwidth", "4M", "--json"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                stdin=subprocess.DEVNULL))  # fmt: skip
            time.sleep(1.0)
        deadline = time.monotonic() + 30
        phases: dict[str, str] = {}
        while time.monotonic() < deadline:
            jobs = lab_env.cli.json("job", "list", "--host", "host-1")
            phases = {j["vm"]: j["phase"] for j in jobs
                      if j["kind"] == "move" and j["vm"] in ("first", "second")}  # fmt: skip
            # The second CLI may ask after the first move began (its start-up at load).
            if phases.get("first") == "copying-memory" and "second" in phases:
                break
            time.sleep(0.3)
        assert phases == {"first": "copying-memory", "second": "queued"}
        for job in lab_env.cli.json("job", "list", "--host", "host-1"):
            if job["kind"] == "move" and job["state"] not in ("done", "failed", "cancelled"):
                assert job["vm"] in ("first", "second")
                lab_env.cli("job", "cancel", job["id"])
        for move in moves:
            assert move.wait(timeout=60) != 0
        assert {vm["name"]: vm["host"] for vm in lab_env.cli.json("vm", "list")} == {
            "first": "host-1",
            "second": "host-1",
        }
    finally:
        for move in moves:
            if move.poll() is None:
                move.kill()
                move.wait()
        for name in ("first", "second"):
            lab_env.cli("vm", "delete", name, "--force", "--host", "host-1", check=False)


def _drop_connections_of(pid: int) -> int:
    """Abort every established TCP connection process ``pid`` holds (a cut network)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    dropped = 0
    for line in out.splitlines():
        if f"pid={pid}," not in line:
            continue
        peer = line.split()[3]
        address, _, port = peer.rpartition(":")
        subprocess.run(["ss", "-K", "dst", address, "dport", "=", f":{port}"],
                       capture_output=True, check=False)  # fmt: skip
        dropped += 1
    return dropped


def test_the_network_drops_mid_copy(lab_env: LabEnv) -> None:
    lab_env.cli("vm", "create", "cutoff", "--host", "host-1", "--guest", "test", "--memory",
                "128M", "--disk", "16M", "--start")  # fmt: skip
    lab_env.wait_console("cutoff", lambda t: "seq 2\n" in t)
    before = lab_env.vm("cutoff")
    env = dict(os.environ, FERRY_HOME=str(lab_env.home))
    move = subprocess.Popen(
        [sys.executable, "-m", "ferry", "vm", "move", "cutoff", "--to", "host-2",
         "--storage", "copy", "--max-bandwidth", "4M"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            jobs = [j for j in lab_env.cli.json("job", "list", "--host", "host-1")
                    if j["vm"] == "cutoff" and j["kind"] == "move"]  # fmt: skip
            if jobs and jobs[-1]["phase"] == "copying-memory":
                break
            assert time.monotonic() < deadline, "the move never reached copying-memory"
            time.sleep(0.2)
        assert _drop_connections_of(before["pid"]) >= 1  # the memory stream (and NBD) cut
        _, err = move.communicate(timeout=90)
        assert move.returncode != 0 and "failed" in err
    finally:
        if move.poll() is None:
            move.kill()
            move.wait()
        if move.stderr is not None:
            move.stderr.close()  # a failure above must not leak the pipe into later tests
    after = lab_env.vm("cutoff")
    assert after["host"] == "host-1" and after["state"] == "running"
    assert after["pid"] == before["pid"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(qemu_pids_for(before["uuid"])) > 1:
        time.sleep(0.2)
    assert qemu_pids_for(before["uuid"]) == [before["pid"]]
    assert lab_env.cli.json("vm", "list", "--host", "host-2") == []
    count = lab_env.console("cutoff").count("seq ")
    lab_env.wait_console("cutoff", lambda t: t.count("seq ") > count + 1)
    lab_env.cli("vm", "delete", "cutoff", "--force")
