"""An in-process TCP proxy on 127.0.0.1 that a test can cut and restore.

Put it between an agent and etcd to take etcd away from that agent alone
while everything else (etcd, the other agents) goes on: :meth:`TcpProxy.cut`
closes every connection and refuses new ones (accepted, then closed at once,
as a host whose path is gone looks to TLS); :meth:`TcpProxy.restore` lets
connections through again. The proxy runs its own event loop in a thread,
so a synchronous test can use it; its port stays the same for its life.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

HOST = "127.0.0.1"


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target`` (host, port) until cut."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        assert target[0] == HOST, "the proxy only ever forwards to 127.0.0.1"
        self.target = target
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="tcp-proxy")  # fmt: skip
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._cut = False
        self.accepted = 0
        self.refused = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def url_host(self) -> str:
        return f"{HOST}:{self._port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    def _call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=10)

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> int:
        """Close every connection and refuse new ones; how many were closed."""
        return int(self._call(self._set_cut(True)))

    def restore(self) -> None:
        self._call(self._set_cut(False))

    async def _set_cut(self, cut: bool) -> int:
        self._cut = cut
        closed = 0
        if cut:
            for writer in list(self._open):
                closed += 1
                self._abort(writer)
        return closed

    @staticmethod
    def _abort(writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        if not transport.is_closing():
            transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            self._abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._abort(writer)
            return
        self.accepted += 1
        self._open.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                self._open.discard(end)
                self._abort(end)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                if self._cut:
                    break
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side ended: end both, as a cut would.
            self._abort(writer)

    def stop(self) -> None:
        async def close() -> None:
            await self._set_cut(True)
            if self._server is not None:
                self._server.close()
            # Every connection was aborted: their handlers end on their own
            # (cancelling them would log a CancelledError from asyncio's streams).
            for _ in range(200):
                if not self._open:
                    break
                await asyncio.sleep(0.01)
            if self._server is not None:
                await self._server.wait_closed()

        with contextlib.suppress(RuntimeError):
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@contextlib.contextmanager
def tcp_proxy(target: tuple[str, int], port: int = 0) -> Iterator[TcpProxy]:
    proxy = TcpProxy(target, port).start()
    try:
        yield proxy
    finally:
        proxy.stop()
