"""The local etcd member of labs and tests: idempotent start, stop by pid from any object,
ports kept across restarts, and one clear error (nothing left running) when it cannot start."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from ferry.adapters import etcd_server, pki
from ferry.adapters.etcd_server import EtcdServer
from ferry.errors import ConfigError

pytestmark = pytest.mark.integration


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    pki.create_ca(tmp_path / "ca", name="etcd-server-test-ca")
    return tmp_path / "ca"


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}/cmdline").exists() and bool(Path(f"/proc/{pid}/cmdline").read_bytes())


def test_start_is_idempotent_and_any_object_stops_it(tmp_path: Path, ca: Path) -> None:
    first = EtcdServer(tmp_path / "etcd", ca)
    try:
        pid = first.start()
        url = first.url
        assert first.start() == pid, "a running member is left alone"
        other = EtcdServer(tmp_path / "etcd", ca)
        assert other.pid() == pid and other.url == url
        other.stop()
        assert not _alive(pid) and first.pid() is None
        assert pid not in etcd_server._children, "the ended member was reaped"
        again = first.start()
        assert again != pid and first.url == url, "the same ports after a restart"
    finally:
        first.stop()
    assert first.pid() is None


def test_a_member_that_cannot_start_is_one_error_and_leaves_nothing(
    tmp_path: Path, ca: Path
) -> None:
    server = EtcdServer(tmp_path / "etcd", ca)
    port = int(server.url.rsplit(":", 1)[1])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(ConfigError) as caught:
            server.start(timeout_s=20)
    assert "address already in use" in str(caught.value)
    assert str(server.log_path) in str(caught.value)
    assert "stacktrace" not in str(caught.value)
    assert "\n" not in str(caught.value)
    assert server.pid() is None
    ports = json.loads((tmp_path / "etcd" / "etcd.json").read_text())
    assert ports["client_port"] == port


def test_a_missing_binary_says_what_to_install(tmp_path: Path, ca: Path) -> None:
    server = EtcdServer(tmp_path / "etcd", ca, binary=str(tmp_path / "no-etcd"))
    with pytest.raises(ConfigError, match="etcd-server"):
        server.start()
    assert server.pid() is None
