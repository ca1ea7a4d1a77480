"""The fault proxy of ferry.testing: each fault does what it says, on an echo server."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from ferry.testing.fault_proxy import PASS, Fault, FaultProxy, fault_proxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = _Server(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with fault_proxy(("127.0.0.1", server.server_address[1])) as proxied:
            yield proxied
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def exchange(proxy: FaultProxy, payload: bytes, timeout: float = 2.0) -> bytes:
    """Send ``payload`` through the proxy; what came back before EOF or the timeout."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as conn:
        got = b""
        try:
            conn.sendall(payload)
            while len(got) < len(payload):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                got += chunk
        except OSError:
            pass
        return got


def test_pass_and_delay(proxy: FaultProxy) -> None:
    assert exchange(proxy, b"x" * 1000) == b"x" * 1000
    proxy.set_fault(Fault("delay", delay_s=0.3))
    started = time.monotonic()
    assert exchange(proxy, b"hello") == b"hello"
    assert time.monotonic() - started >= 0.5  # once up, once down


def test_drop_forwards_nothing(proxy: FaultProxy) -> None:
    proxy.set_fault(Fault("drop"))
    assert exchange(proxy, b"hello", timeout=0.5) == b""
    proxy.set_fault(PASS)
    assert exchange(proxy, b"hello") == b"hello"


def test_cut_refuses_and_cut_after_ends_mid_stream(proxy: FaultProxy) -> None:
    proxy.cut()
    assert exchange(proxy, b"hello") == b""
    assert proxy.refused == 1 and proxy.is_cut
    proxy.set_fault(Fault("cut", after_bytes=100, direction="up"))
    assert not proxy.is_cut
    got = exchange(proxy, b"y" * 1000)
    assert got == b"y" * 100 or len(got) < 100  # never more than the first 100 bytes
    assert proxy.cut_streams == 1
    proxy.restore()
    assert exchange(proxy, b"hello") == b"hello"


def test_corrupt_flips_one_byte_of_the_next_connections(proxy: FaultProxy) -> None:
    proxy.set_fault(Fault("corrupt", after_bytes=10, direction="down", count=1))
    payload = bytes(range(64))
    got = exchange(proxy, payload)
    assert len(got) == len(payload) and got != payload
    assert [i for i in range(64) if got[i] != payload[i]] == [10]
    assert got[10] == payload[10] ^ 0xFF
    assert exchange(proxy, payload) == payload  # count=1: only the first connection
    assert proxy.corrupted == 1


def test_only_loopback() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        FaultProxy(("10.0.0.1", 80))


def connect(proxy: FaultProxy) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    return conn


def echoes(conn: socket.socket, payload: bytes) -> bool:
    """Whether ``payload`` comes back whole over ``conn``."""
    try:
        conn.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = conn.recv(65536)
            if not chunk:
                return False
            got += chunk
        return got == payload
    except OSError:
        return False


def test_the_proxy_forwards_cuts_and_restores(proxy: FaultProxy) -> None:
    port = proxy.port
    big = bytes(range(256)) * 4096  # 1 MiB: several reads each way
    with connect(proxy) as before:
        assert echoes(before, b"hello") and echoes(before, big)
        assert proxy.cut() == 2  # the client's end and the upstream end
        assert proxy.is_cut
        # The open connection is gone...
        assert not echoes(before, b"still there?")
    # ...and new ones are refused (accepted, then closed at once).
    with connect(proxy) as during:
        assert not echoes(during, b"anyone?")
    assert proxy.refused == 1
    proxy.restore()
    assert proxy.port == port
    with connect(proxy) as after:
        assert echoes(after, b"back") and echoes(after, big)
    assert proxy.accepted == 2
