"""The agent as a systemd service: sd_notify readiness, stopping and watchdog, the unit file.

A real agent process (its own CA and data dir, TCG) runs with ``$NOTIFY_SOCKET``
pointing at a datagram socket this test binds in the abstract namespace,
as systemd's would be. The unit file is checked by ``systemd-analyze verify``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from ferry.adapters import loopback, pki
from ferry.packaging import agent_unit


@pytest.fixture
def host_toml(tmp_path: Path) -> tuple[Path, int]:
    pki.create_ca(tmp_path / "ca")
    pki.issue_host_cert(tmp_path / "ca", tmp_path / "tls", "svc-1", ips=["127.0.0.1"])
    port = loopback.free_port()
    config = {"name": "svc-1", "listen": f"127.0.0.1:{port}", "data_dir": str(tmp_path / "data"),
              "tls_dir": str(tmp_path / "tls"), "accelerator": "tcg",
              "run_dir": str(tmp_path / "run")}  # fmt: skip
    path = tmp_path / "host.toml"
    path.write_text(tomli_w.dumps(config))
    return path, port


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"@ferry-test-notify-{uuid.uuid4().hex[:12]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name[1:].encode())
    try:
        yield sock, name
    finally:
        sock.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _receive(sock: socket.socket, timeout: float) -> dict[str, str]:
    sock.settimeout(timeout)
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_ready_after_listening_watchdog_and_stopping(
    host_toml: tuple[Path, int], notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> None:
    config, port = host_toml
    sock, name = notify_socket
    env = dict(os.environ, NOTIFY_SOCKET=name, WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    stderr = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferry", "agent", "--config", str(config), "--log-format", "json"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
    )  # fmt: skip
    try:
        first = _receive(sock, timeout=120)
        # The first message is READY=1, and by then the HTTPS port answers.
        assert _accepts(port), "READY=1 came before the agent listened"
        assert first["READY"] == "1" and first["MAINPID"] == str(proc.pid)
        assert first["STATUS"] == f"serving https://127.0.0.1:{port}"
        # WatchdogSec=0.4 s: pings every 0.2 s from the event loop.
        started = time.monotonic()
        pings = [_receive(sock, timeout=5) for _ in range(3)]
        assert all(p == {"WATCHDOG": "1"} for p in pings), pings
        assert time.monotonic() - started < 3
        proc.send_signal(signal.SIGTERM)
        while (message := _receive(sock, timeout=30)) == {"WATCHDOG": "1"}:
            pass
        assert message["STOPPING"] == "1", message
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    lines = (tmp_path / "agent.log").read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON event
    assert any(e["msg"].startswith("agent svc-1 serving") for e in events), lines
    assert all(e["host"] == "svc-1" and {"ts", "level", "logger", "msg"} <= set(e)
               for e in events)  # fmt: skip


def test_without_notify_socket_the_agent_runs_as_before(host_toml: tuple[Path, int],
                                                        tmp_path: Path) -> None:  # fmt: skip
    config, port = host_toml
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "FERRY_LOG_FORMAT")}
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ferry", "agent", "--config", str(config)], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not _accepts(port):
            assert proc.poll() is None and time.monotonic() < deadline, "the agent did not listen"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert " INFO ferry.agent: agent svc-1 serving" in text  # the text format
    assert "cannot notify" not in text


def test_the_unit_file_verifies(tmp_path: Path) -> None:
    unit = agent_unit()
    for directive in ("Type=notify", "Restart=on-failure", "KillMode=process",
                      "DeviceAllow=/dev/kvm rw", "DeviceAllow=/dev/net/tun rw",
                      "WatchdogSec=", "--log-format json"):  # fmt: skip
        assert directive in unit
    assert "MemoryDenyWriteExecute=yes" not in unit  # TCG writes and runs code
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (Debian: systemd); unit not verified")
    # ExecStart must name an executable that exists: this venv's ferry.
    ferry = Path(sys.executable).with_name("ferry")
    path = tmp_path / "ferry-agent.service"
    path.write_text(unit.replace("/opt/ferry/venv/bin/ferry", str(ferry)))
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    complaints = [line for line in result.stderr.splitlines() if path.name in line]
    assert result.returncode == 0 and not complaints, result.stderr
    # The check can fail: a misspelt directive is reported.
    path.write_text(unit.replace("Type=notify", "Type=notifyy"))
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert any(path.name in line for line in result.stderr.splitlines()), result.stderr
