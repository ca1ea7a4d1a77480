"""The guest's file systems frozen around one replication cut (app-consistent points).

A cycle that :func:`ferry.core.guest_agent.freeze_due` picks hands a
:class:`FreezeWindow` to the backup, which holds it around the QMP
transaction alone (the point in time; the target files and nodes are made
before, the copy runs after)::

    window = FreezeWindow(socket, vm=name)
    await tracker.delta(..., cut=window)   # async with window: transaction
    window.app_consistent                  # the transaction ran frozen

The window freezes on entry through the guest agent; a freeze that fails
(no agent in the guest, an error, a timeout) is recorded in ``error`` and
the cut goes on crash-consistent. The guest is thawed on exit, whatever
happened (an error, a cancellation: the thaw runs shielded, so a second
cancel cannot leave the guest frozen), or earlier by a watchdog after
``limit`` seconds (a transaction that hangs must not stall the guest's
writes; the point is then only crash-consistent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from types import TracebackType

from ferry.adapters.guest_agent import SYNC_TIMEOUT_S, GuestAgent, thaw_quietly
from ferry.core.guest_agent import MAX_FREEZE_S
from ferry.errors import GuestAgentError

log = logging.getLogger(__name__)


class FreezeWindow:
    """Freeze VM ``vm``'s file systems on entry; thaw at the cut, on timeout and on exit."""

    def __init__(self, socket_path: Path, *, vm: str, limit: float = MAX_FREEZE_S,
                 sync_timeout: float = SYNC_TIMEOUT_S) -> None:  # fmt: skip
        self.socket_path = socket_path
        self.vm = vm
        self.limit = limit
        self.sync_timeout = sync_timeout
        self.attempted = False  # entered: a freeze was tried
        self.error: str | None = None  # why the freeze failed (the point is crash-consistent)
        self.frozen_s: float | None = None  # how long the guest stayed frozen
        self._agent: GuestAgent | None = None
        self._frozen_at: float | None = None
        self._cut_frozen = False
        self._watchdog: asyncio.Task[None] | None = None
        self._thawing: asyncio.Task[None] | None = None

    @property
    def app_consistent(self) -> bool:
        """The cut was taken while every file system was frozen."""
        return self._cut_frozen

    async def __aenter__(self) -> FreezeWindow:
        self.attempted = True
        agent = GuestAgent(self.socket_path, vm=self.vm, sync_timeout=self.sync_timeout)
        try:
            await agent.__aenter__()
            self._agent = agent
            count = await agent.freeze()
        except GuestAgentError as exc:
            self.error = str(exc)
            log.warning("VM %s: no app-consistent point this time, freeze failed: %s",
                        self.vm, exc)  # fmt: skip
            await agent.close()
            if self._agent is not None:
                # The freeze itself failed: it may have frozen some (qemu-ga
                # thaws those on an error, a timeout leaves it unknown). A new
                # session, so a late reply to the freeze is not read as the thaw's.
                self._agent = None
                await thaw_quietly(self.socket_path, vm=self.vm)
            return self
        self._frozen_at = time.monotonic()
        log.info("VM %s: %d file systems frozen for the cut", self.vm, count)
        self._watchdog = asyncio.create_task(self._expire(), name=f"freeze-watchdog-{self.vm}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        if exc_type is None and self._frozen_at is not None and self._thawing is None:
            self._cut_frozen = True  # the body (the transaction) ended, still frozen
        if self._watchdog is not None:
            self._watchdog.cancel()
        # Shielded: a cancelled cycle still thaws its guest to the end.
        await asyncio.shield(self._thaw_once())

    async def _expire(self) -> None:
        await asyncio.sleep(self.limit)
        log.warning("VM %s: the cut took more than %.0f s; thawing the guest (this point is "
                    "crash-consistent only)", self.vm, self.limit)  # fmt: skip
        self.error = f"the cut did not happen within {self.limit:.0f} s of the freeze"
        await self._thaw_once()

    async def _thaw_once(self) -> None:
        if self._thawing is None:
            self._thawing = asyncio.ensure_future(self._thaw_now())
        await asyncio.shield(self._thawing)

    async def _thaw_now(self) -> None:
        agent, self._agent = self._agent, None
        thawed: int | None = None
        if agent is not None:
            try:
                thawed = await agent.thaw()
            except GuestAgentError as exc:
                log.warning("VM %s: thaw failed, trying a new session: %s", self.vm, exc)
            finally:
                await agent.close()
        if thawed is None and self._frozen_at is not None:
            thawed = await thaw_quietly(self.socket_path, vm=self.vm)
        if self._frozen_at is not None:
            self.frozen_s = time.monotonic() - self._frozen_at
            log.info("VM %s: file systems thawed after %.3f s (%s)", self.vm, self.frozen_s,
                     "thawed" if thawed is not None else "THAW FAILED")  # fmt: skip
        if self._watchdog is not None and asyncio.current_task() is not self._watchdog:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
