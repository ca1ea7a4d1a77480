"""A scripted QMP channel: QEMU sequences driven and checked without QEMU.

:class:`FakeQmp` satisfies :class:`ferry.adapters.migration.Channel` (and so
stands in wherever a :class:`ferry.adapters.qemu.QmpChannel` is used through
that interface). A test scripts it:

- ``reply(command, *replies)``: the replies to ``command``, in order; the
  last one repeats. A reply may be an exception instance, raised instead.
- ``on(command, handler)``: a computed reply, ``handler(arguments)``; it may
  change what later queries see and :meth:`emit` events (a small QEMU model).
- ``fail(command, message)``: the command is refused as QEMU refuses
  (:class:`~ferry.errors.QemuError`).
- ``emit(name, data)``: an event, heard by every ``listen`` block open now
  that listens for ``name``.

Unscripted commands return ``{}`` as most QMP commands do, except the
queries whose replies are lists or carry a status: ``query-block-jobs``
(``[]``) and ``query-status`` (``running``). ``calls`` records every command
with its arguments, in order, for asserting the exact sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from ferry.core.vmstate import QemuStatus
from ferry.errors import QemuError

Handler = Callable[[dict[str, Any] | None], Any]

DEFAULTS: dict[str, Any] = {
    "query-block-jobs": [],
    "query-status": {"status": "running", "singlestep": False, "running": True},
}


class FakeEvents:
    """The events one ``listen`` block hears."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = frozenset(names)
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def next(self, timeout: float) -> dict[str, Any] | None:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the
        # result when a cancellation arrives together with it, and loses that.
        try:
            async with asyncio.timeout(timeout):
                return await self.queue.get()
        except TimeoutError:
            return None


class FakeQmp:
    """One scripted QEMU's QMP connection."""

    def __init__(self, name: str = "vm") -> None:
        self.name = name
        self.calls: list[tuple[str, dict[str, Any] | None]] = []
        self.events: list[dict[str, Any]] = []  # every event emitted, in order
        self._replies: dict[str, deque[Any]] = {}
        self._handlers: dict[str, Handler] = {}
        self._listeners: list[FakeEvents] = []

    # -- scripting ----------------------------------------------------------------

    def reply(self, command: str, *replies: Any) -> None:
        if not replies:
            raise ValueError(f"script at least one reply to {command}")
        self._handlers.pop(command, None)
        self._replies[command] = deque(replies)

    def on(self, command: str, handler: Handler) -> None:
        self._replies.pop(command, None)
        self._handlers[command] = handler

    def fail(self, command: str, message: str = "refused") -> None:
        self.reply(command, QemuError(f"QEMU of VM {self.name!r} refused {command}: {message}"))

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        now = time.time()  # QEMU stamps each event with the host's wall clock
        stamp = {"seconds": int(now), "microseconds": int(now % 1 * 1_000_000)}
        event = {"event": name, "data": dict(data or {}), "timestamp": stamp}
        self.events.append(event)
        for listener in self._listeners:
            if name in listener.names:
                listener.queue.put_nowait(event)

    # -- what was asked ---------------------------------------------------------------

    def commands(self) -> list[str]:
        """The commands executed so far, in order (queries included)."""
        return [command for command, _ in self.calls]

    def actions(self) -> list[str]:
        """The commands executed so far that are not ``query-*`` polls."""
        return [command for command in self.commands() if not command.startswith("query-")]

    def arguments(self, command: str) -> list[dict[str, Any] | None]:
        """The arguments of every call of ``command``, in order."""
        return [args for name, args in self.calls if name == command]

    # -- the Channel interface ----------------------------------------------------------

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.calls.append((command, arguments))
        await asyncio.sleep(0)  # a real call yields to the loop too
        if command in self._handlers:
            reply = self._handlers[command](arguments)
        elif command in self._replies:
            queue = self._replies[command]
            reply = queue.popleft() if len(queue) > 1 else queue[0]
        else:
            reply = DEFAULTS.get(command, {})
        if isinstance(reply, BaseException):
            raise reply
        return reply

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[FakeEvents]:
        listener = FakeEvents(names)
        self._listeners.append(listener)
        try:
            yield listener
        finally:
            self._listeners.remove(listener)

    async def status(self) -> QemuStatus:
        reply = await self.execute("query-status")
        return QemuStatus(str(reply["status"]))
