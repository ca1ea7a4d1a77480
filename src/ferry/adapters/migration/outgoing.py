"""The source's QMP sequences of a move: memory stream, disk mirrors, switch-over, undo.

In DESIGN.md section 4's order (libvirt's): the migration is configured
(TLS client credential, capabilities ``events``, ``pause-before-switchover``
and ``dirty-bitmaps``, bandwidth and downtime); for a disk copy each disk is
mirrored (``blockdev-mirror``, sync full) into an NBD node on the
destination until every mirror is ready; then ``migrate`` runs until QEMU
pauses in ``pre-switchover``; at switch-over each mirror is completed
(``block-job-cancel`` of a ready mirror leaves its target consistent), and
``migrate-continue`` sends the last pages. An :class:`OutgoingMigration`
remembers what it set up in the source QEMU, so :meth:`~OutgoingMigration.undo`
takes exactly that down again and lets the guest run on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.adapters.migration.channel import (
    BROKEN,
    IN_FLIGHT,
    Channel,
    Events,
    MigrationInfo,
    MigrationStatus,
    block_jobs,
    query_migrate,
)
from ferry.adapters.migration.convergence import Convergence
from ferry.adapters.migration.disk_copy import mirror_arguments, nbd_target
from ferry.core.vmstate import QemuStatus
from ferry.errors import FerryError, MoveFailedError

POLL_S = 0.5  # between progress polls; an event ends the wait at once
SWITCH_OVER_JOBS_S = 60.0  # how long completing the mirrors may take at switch-over
TIMES_WAIT_S = 1.0  # how long QEMU may take to fill in a completed migration's times
UNDO_WAIT_S = 15.0  # how long an undo waits for QEMU to let go of a stream or mirror
EVENTS = ("MIGRATION", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR")
# A source QEMU in these states holds the guest stopped for the move.
_HELD = frozenset({QemuStatus.PAUSED, QemuStatus.POSTMIGRATE, QemuStatus.FINISH_MIGRATE})


@dataclass(frozen=True)
class MirrorProgress:
    done: int
    total: int


Check = Callable[[], Awaitable[None]]


class OutgoingMigration:
    """One move's streams out of one source QEMU.

    ``tag`` makes QEMU's object, node and job ids unique to the move;
    ``target`` is the destination host's name (its certificate's, for TLS).
    """

    def __init__(self, channel: Channel, *, tag: str, target: str) -> None:
        self.channel = channel
        self.tag = tag
        self.target = target
        self.tls_id: str | None = None
        self.nbd_nodes: list[str] = []
        self.mirrors: list[str] = []
        self.migrating = False
        self._events: Events | None = None

    async def rediscover(self, disks: int) -> MigrationStatus:
        """After an agent restart: take what the move may have left in QEMU as set up.

        Returns the stream's status. The stream counts as started and every
        mirror and NBD node the move may have made as present, so an undo
        tries them all.
        """
        self.migrating = True
        jobs = await block_jobs(self.channel)
        self.mirrors = [device for device in jobs if device.endswith(self.tag)]
        self.nbd_nodes = [f"nbd{i}-{self.tag}" for i in range(disks)]
        return (await query_migrate(self.channel)).status

    async def configure(
        self,
        *,
        tls_dir: Path | None,
        max_bandwidth: int,
        downtime_limit_ms: int | None,
        convergence: Convergence = Convergence(),
    ) -> None:
        """Capabilities and parameters of the stream; TLS with ``tls_dir``'s certificates.

        ``convergence``: auto-converge (QEMU throttles a guest that dirties
        memory faster than the link) and post-copy (:mod:`.convergence`).
        """
        if tls_dir is not None:
            tls_id = f"ferry-tls-{self.tag}"
            await self.channel.execute("object-add", {
                "qom-type": "tls-creds-x509", "id": tls_id, "endpoint": "client",
                "dir": str(tls_dir), "verify-peer": True})  # fmt: skip
            self.tls_id = tls_id
        await self.channel.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True},
            {"capability": "pause-before-switchover", "state": True},
            {"capability": "dirty-bitmaps", "state": True},
            *convergence.capabilities(),
        ]})  # fmt: skip
        params: dict[str, Any] = {
            "tls-creds": self.tls_id or "",
            "tls-hostname": self.target if self.tls_id else "",
            "max-bandwidth": max_bandwidth,
        }
        if downtime_limit_ms:
            params["downtime-limit"] = downtime_limit_ms
        await self.channel.execute("migrate-set-parameters", params)

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """Hear the stream's and the mirrors' events for the block (waits end early)."""
        with self.channel.listen(*EVENTS) as events:
            self._events = events
            try:
                yield
            finally:
                self._events = None

    async def _pause(self, timeout: float) -> None:
        if self._events is None:
            await asyncio.sleep(timeout)
        else:
            await self._events.next(timeout)

    # -- disks ----------------------------------------------------------------

    async def mirror_disks(self, sizes: Sequence[int], nbd: tuple[str, int], *, speed: int) -> None:
        """Mirror disk0..disk{n-1} (of ``sizes`` bytes) into the destination's NBD
        exports of the same names.

        ``speed`` caps the move, not each disk: QEMU caps each job, so each
        mirror gets the share of the cap that its disk has of the total size.
        """
        host, port = nbd
        total = sum(sizes) or 1
        for index, size in enumerate(sizes):
            node = f"nbd{index}-{self.tag}"
            node_args = nbd_target(node, f"disk{index}", (host, port), tls_id=self.tls_id,
                                   tls_hostname=self.target)  # fmt: skip
            # Noted before it is sent: a cancel may land while QEMU makes it,
            # and undo must take down whatever QEMU made (a missing one is skipped).
            self.nbd_nodes.append(node)
            await self.channel.execute("blockdev-add", node_args)
            mirror = f"mirror{index}-{self.tag}"
            share = max(1, speed * size // total) if speed else 0
            mirror_args = mirror_arguments(mirror, f"disk{index}", node, speed=share)
            self.mirrors.append(mirror)
            await self.channel.execute("blockdev-mirror", mirror_args)

    async def wait_mirrors_ready(
        self, report: Callable[[MirrorProgress], None], check: Check
    ) -> None:
        """Until every mirror is ready (in step); ``check`` runs between polls."""
        while True:
            jobs = await block_jobs(self.channel)
            missing = [m for m in self.mirrors if m not in jobs]
            if missing:
                raise MoveFailedError(f"disk copy {missing[0]} to host {self.target!r} failed")
            mine = [jobs[m] for m in self.mirrors]
            report(MirrorProgress(sum(j.offset for j in mine), sum(j.length for j in mine)))
            if all(j.ready for j in mine):
                return
            await check()
            await self._pause(POLL_S)

    async def _wait_mirrors_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not set(await block_jobs(self.channel)) & set(self.mirrors):
                return
            if time.monotonic() > deadline:
                raise MoveFailedError("disk copies did not finish at switch-over")
            await self._pause(0.05)

    # -- memory -----------------------------------------------------------------

    async def migrate(self, uri: str) -> None:
        self.migrating = True  # before it is sent, as with the mirrors
        await self.channel.execute("migrate", {"uri": uri})

    async def wait_for(
        self,
        status: MigrationStatus,
        report: Callable[[MigrationInfo], None],
        check: Check | None = None,
    ) -> MigrationInfo:
        """Until the stream reaches ``status``; MoveFailedError if it breaks first."""
        while True:
            info = await query_migrate(self.channel)
            report(info)
            if info.status is status:
                return info
            if info.status in BROKEN:
                raise MoveFailedError(f"memory copy failed: {info.error or info.status.value}")
            if check is not None:
                await check()
            await self._pause(POLL_S)

    async def start_postcopy(
        self, report: Callable[[MigrationInfo], None], check: Check | None = None
    ) -> bool:
        """Once the first pass is done, ask QEMU to switch to post-copy (:mod:`.convergence`).

        False if the stream reached ``pre-switchover`` first (it converged by
        itself: the move ends as a pre-copy one).
        """
        while True:
            info = await query_migrate(self.channel)
            report(info)
            if info.status is MigrationStatus.PRE_SWITCHOVER:
                return False
            if info.status in BROKEN:
                raise MoveFailedError(f"memory copy failed: {info.error or info.status.value}")
            if info.dirty_sync_count > 1:
                await self.channel.execute("migrate-start-postcopy")
                return True
            if check is not None:
                await check()
            await self._pause(POLL_S)

    # -- switch-over and undo ---------------------------------------------------

    async def switch_over(self, report: Callable[[MigrationInfo], None]) -> MigrationInfo:
        """From ``pre-switchover``: complete the mirrors, send the last pages."""
        await self.complete_mirrors()
        return await self.continue_switch_over(report)

    async def complete_mirrors(self) -> None:
        """At ``pre-switchover``: complete every mirror at once (the guest is paused)."""
        # Side by side: each cancel is one round trip, and the guest waits for all.
        await asyncio.gather(*(self.channel.execute("block-job-cancel", {"device": mirror})
                               for mirror in self.mirrors))  # fmt: skip
        await self._wait_mirrors_gone(SWITCH_OVER_JOBS_S)

    async def continue_switch_over(self, report: Callable[[MigrationInfo], None]) -> MigrationInfo:
        """Send the last pages (``migrate-continue``) until ``completed``; QEMU's times."""
        await self.channel.execute("migrate-continue", {"state": "pre-switchover"})
        info = await self.wait_for(MigrationStatus.COMPLETED, report)
        # QEMU 7.2 reports ``completed`` a moment before it fills in the times
        # (downtime 0 then): ask again until they are there.
        deadline = time.monotonic() + TIMES_WAIT_S
        while info.total_time_ms == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            info = await query_migrate(self.channel)
        return info

    async def undo(self) -> QemuStatus:
        """Take down what this move set up and let the guest run here; its run state.

        Each step is tried even if one before it failed; only reading the
        run state at the end (or resuming the guest) may raise.
        """
        channel = self.channel
        if self.migrating:
            with contextlib.suppress(FerryError):
                await channel.execute("migrate_cancel")
            with contextlib.suppress(FerryError):
                deadline = time.monotonic() + UNDO_WAIT_S
                while time.monotonic() < deadline:
                    if (await query_migrate(channel)).status not in IN_FLIGHT:
                        break
                    await asyncio.sleep(0.05)
        for mirror in self.mirrors:
            with contextlib.suppress(FerryError):
                await channel.execute("block-job-cancel", {"device": mirror, "force": True})
        with contextlib.suppress(FerryError):
            await self._wait_mirrors_gone(UNDO_WAIT_S)
        for node in self.nbd_nodes:
            with contextlib.suppress(FerryError):
                await channel.execute("blockdev-del", {"node-name": node})
        if await channel.status() in _HELD:
            await channel.execute("cont")
        return await channel.status()
