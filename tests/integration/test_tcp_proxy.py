"""The test TCP proxy: it forwards, a cut closes every connection and refuses new
ones, and a restore lets them through again on the same port."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tests.integration.tcp_proxy import TcpProxy, tcp_proxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    server = _Server(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with tcp_proxy(("127.0.0.1", server.server_address[1])) as proxied:
            yield proxied
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def connect(proxy: TcpProxy) -> socket.socket:
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


def test_the_proxy_forwards_cuts_and_restores(proxy: TcpProxy) -> None:
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
