"""Talks to a VM's QEMU guest agent over the unix socket of its virtio-serial port.

The wire format and the sync that starts every session are in
:mod:`ferry.core.guest_agent`. This module owns the socket: every call has a
timeout, and everything that goes wrong (no socket, QEMU gone, no agent in
the guest, an error reply) leaves as :class:`~ferry.errors.GuestAgentError`,
translated here. A session is short (one freeze, one ping): the channel
takes one client at a time, and QEMU drops a client when its VM migrates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from pathlib import Path
from types import TracebackType
from typing import Any

from ferry.core.guest_agent import (
    COMMAND_TIMEOUT_S,
    FREEZE_TIMEOUT_S,
    Reply,
    ReplyReader,
    encode_command,
    encode_sync,
)
from ferry.errors import GuestAgentError

log = logging.getLogger(__name__)

# Without qemu-ga in the guest QEMU still accepts the connection; only the
# sync going unanswered tells, so it is given a bound of its own.
SYNC_TIMEOUT_S = 5.0


class GuestAgent:
    """One session with the guest agent of VM ``vm``: ``async with GuestAgent(...) as ga``."""

    def __init__(self, socket_path: Path, *, vm: str,
                 sync_timeout: float = SYNC_TIMEOUT_S) -> None:  # fmt: skip
        self.socket_path = socket_path
        self.vm = vm
        self.sync_timeout = sync_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._replies = ReplyReader()
        self._queue: list[Reply] = []

    async def __aenter__(self) -> GuestAgent:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path)), COMMAND_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            raise GuestAgentError(
                f"VM {self.vm!r} has no guest agent channel to connect to "
                f"({self.socket_path}: {getattr(exc, 'strerror', None) or exc}); is it running "
                "and was it created with --guest-agent?", vm=self.vm) from exc  # fmt: skip
        try:
            await self._sync()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        await self.close()

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # -- commands ------------------------------------------------------------------

    async def ping(self) -> None:
        await self.execute("guest-ping")

    async def freeze(self) -> int:
        """Freeze every file system of the guest; returns how many were frozen."""
        return int(await self.execute("guest-fsfreeze-freeze", timeout=FREEZE_TIMEOUT_S))

    async def thaw(self) -> int:
        """Thaw them; returns how many were thawed (0: none was frozen)."""
        return int(await self.execute("guest-fsfreeze-thaw"))

    async def freeze_status(self) -> str:
        """``thawed`` or ``frozen``."""
        return str(await self.execute("guest-fsfreeze-status"))

    async def shutdown(self, mode: str = "powerdown") -> None:
        """Ask the guest to shut itself down; the agent sends no reply when it obeys."""
        await self._send(encode_command("guest-shutdown", {"mode": mode}), "guest-shutdown")
        try:
            reply = await self._next("guest-shutdown", 1.0)
        except GuestAgentError:
            return  # silence (or the channel closing) is the agent obeying
        if not reply.ok:
            raise self._refused("guest-shutdown", reply)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout: float = COMMAND_TIMEOUT_S) -> Any:  # fmt: skip
        """Run ``command``; its return value, or :class:`GuestAgentError`."""
        await self._send(encode_command(command, arguments), command)
        reply = await self._next(command, timeout)
        if not reply.ok:
            raise self._refused(command, reply)
        return reply.value

    # -- the channel ---------------------------------------------------------------

    async def _sync(self) -> None:
        sync_id = secrets.randbelow(2**31)
        self._replies.expect_sync(sync_id)
        await self._send(encode_sync(sync_id), "guest-sync-delimited")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.sync_timeout
        while not self._replies.synced:
            left = deadline - loop.time()
            if left <= 0:
                raise GuestAgentError(
                    f"the guest agent of VM {self.vm!r} did not answer within "
                    f"{self.sync_timeout:.0f} s: is qemu-guest-agent running in the guest?",
                    vm=self.vm, command="guest-sync-delimited")  # fmt: skip
            await self._read("guest-sync-delimited", left)

    async def _send(self, data: bytes, command: str) -> None:
        if self._writer is None:
            raise self._error(command, "the session is closed")
        try:
            self._writer.write(data)
            await asyncio.wait_for(self._writer.drain(), COMMAND_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise self._error(command, f"cannot send it: {exc}") from exc

    async def _next(self, command: str, timeout: float) -> Reply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._queue:
            left = deadline - loop.time()
            if left <= 0:
                raise self._error(command, f"no answer within {timeout:.0f} s")
            await self._read(command, left)
        return self._queue.pop(0)

    async def _read(self, command: str, timeout: float) -> None:
        assert self._reader is not None
        try:
            data = await asyncio.wait_for(self._reader.read(65536), timeout)
        except TimeoutError:
            return  # the caller's deadline decides
        except OSError as exc:
            raise self._error(command, f"the channel failed: {exc}") from exc
        if not data:
            raise self._error(command, "the channel closed (QEMU gone?)")
        try:
            self._queue += self._replies.feed(data)
        except GuestAgentError as exc:
            raise self._error(command, f"garbage on the channel: {exc}") from exc

    def _error(self, command: str, what: str, error_class: str = "") -> GuestAgentError:
        return GuestAgentError(f"the guest agent of VM {self.vm!r}, {command}: {what}",
                               vm=self.vm, command=command, error_class=error_class)  # fmt: skip

    def _refused(self, command: str, reply: Reply) -> GuestAgentError:
        return self._error(command, f"refused: {reply.desc or reply.error_class}",
                           reply.error_class)  # fmt: skip


async def thaw_quietly(socket_path: Path, *, vm: str) -> int | None:
    """Thaw in a new session (the one that froze may be broken); None if it cannot.

    Used where a thaw must be tried whatever came before (a failed or
    cancelled cut); a failure is logged, never raised.
    """
    try:
        async with GuestAgent(socket_path, vm=vm) as agent:
            return await agent.thaw()
    except GuestAgentError as exc:
        log.warning("VM %s: could not thaw the guest's file systems: %s", vm, exc)
        return None
