"""A TCP fault proxy on 127.0.0.1: forwards to a target and drops, delays, cuts or corrupts.

Put it between two agents (a host's URL in the admin's settings pointing at
the proxy, so the peer URL a command hands on is the proxy's) or between an
agent and etcd. The proxy runs its own event loop in a thread, so a
synchronous test can use it; its port stays the same for its life.

Faults (:class:`Fault`, set with :meth:`FaultProxy.set_fault`; new and open
connections follow the fault in force when their next chunk arrives):

- ``pass``: forward everything (the default);
- ``cut``: close every connection and refuse new ones (accepted, then closed
  at once, as a host whose path is gone looks to TLS); :meth:`cut` and
  :meth:`restore` are shorthands. With ``after_bytes``, a connection is cut
  only once that many bytes went one way (a stream cut mid-way);
- ``drop``: accept and read, forward nothing (a black hole: the peer waits
  for its own timeout);
- ``delay``: forward each chunk ``delay_s`` late;
- ``corrupt``: flip one byte (XOR 0xFF) at offset ``after_bytes`` of the
  ``up`` (client to target) or ``down`` stream of each connection, for the
  next ``count`` connections that get that far (``count`` 0: all).

Counters (``accepted``, ``refused``, ``cut_streams``, ``corrupted``) say what
the proxy did, so a test can tell a fault that never hit from one that did.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

HOST = "127.0.0.1"
CHUNK = 65536

FaultKind = Literal["pass", "cut", "drop", "delay", "corrupt"]
Direction = Literal["up", "down"]


@dataclass(frozen=True)
class Fault:
    kind: FaultKind = "pass"
    after_bytes: int = 0  # cut / corrupt: the stream offset where it strikes
    delay_s: float = 0.0  # delay: per chunk
    direction: Direction = "up"  # cut-after / corrupt: which stream
    count: int = 0  # corrupt: how many connections (0: every one)


PASS = Fault()


class _Flow:
    """What one connection has seen so far, per direction."""

    def __init__(self) -> None:
        self.sent: dict[Direction, int] = {"up": 0, "down": 0}
        self.corrupted = False


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target`` (host, port), with faults on demand."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        if target[0] != HOST:
            raise ValueError("the fault proxy only ever forwards to 127.0.0.1")
        self.target = target
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fault-proxy")  # fmt: skip
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._fault = PASS
        self._corrupt_left = 0
        self.accepted = 0
        self.refused = 0
        self.cut_streams = 0
        self.corrupted = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def url_host(self) -> str:
        return f"{HOST}:{self._port}"

    @property
    def fault(self) -> Fault:
        return self._fault

    @property
    def is_cut(self) -> bool:
        return self._fault.kind == "cut" and self._fault.after_bytes == 0

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=10)

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    def set_fault(self, fault: Fault) -> int:
        """Put ``fault`` in force; a plain cut closes the open connections (how many)."""
        return int(self._call(self._set_fault(fault)))

    def cut(self) -> int:
        """Close every connection and refuse new ones; how many were closed."""
        return self.set_fault(Fault("cut"))

    def restore(self) -> None:
        self.set_fault(PASS)

    async def _set_fault(self, fault: Fault) -> int:
        self._fault = fault
        self._corrupt_left = fault.count
        closed = 0
        if fault.kind == "cut" and fault.after_bytes == 0:
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
        if self.is_cut:
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
        flow = _Flow()
        try:
            await asyncio.gather(self._pipe(reader, up_writer, flow, "up"),
                                 self._pipe(up_reader, writer, flow, "down"))  # fmt: skip
        finally:
            for end in (writer, up_writer):
                self._open.discard(end)
                self._abort(end)

    def _strike(self, chunk: bytes, flow: _Flow, direction: Direction) -> bytes | None:
        """``chunk`` as the fault in force lets it through; None ends the connection."""
        fault = self._fault
        start = flow.sent[direction]
        flow.sent[direction] = start + len(chunk)
        past = direction == fault.direction and start + len(chunk) > fault.after_bytes
        if fault.kind == "cut" and (fault.after_bytes == 0 or past):
            if fault.after_bytes:
                self.cut_streams += 1
                return chunk[: max(0, fault.after_bytes - start)] or None
            return None
        if (fault.kind == "corrupt" and direction == fault.direction and not flow.corrupted
                and start <= fault.after_bytes < start + len(chunk)
                and (fault.count == 0 or self._corrupt_left > 0)):  # fmt: skip
            flow.corrupted = True
            self._corrupt_left -= 1
            self.corrupted += 1
            at = fault.after_bytes - start
            return chunk[:at] + bytes([chunk[at] ^ 0xFF]) + chunk[at + 1 :]
        return chunk

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    flow: _Flow, direction: Direction) -> None:  # fmt: skip
        try:
            while chunk := await reader.read(CHUNK):
                fault = self._fault
                if fault.kind == "drop":
                    continue
                if fault.kind == "delay":
                    await asyncio.sleep(fault.delay_s)
                passed = self._strike(chunk, flow, direction)
                if passed is None:
                    break
                writer.write(passed)
                await writer.drain()
                if len(passed) < len(chunk):  # cut mid-stream: the rest never goes
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            # One side ended: end both, as a cut would.
            self._abort(writer)

    def stop(self) -> None:
        async def close() -> None:
            await self._set_fault(Fault("cut"))
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
def fault_proxy(target: tuple[str, int], port: int = 0) -> Iterator[FaultProxy]:
    proxy = FaultProxy(target, port).start()
    try:
        yield proxy
    finally:
        proxy.stop()
