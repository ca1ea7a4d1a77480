"""What the migration sequences need of a QMP connection, and what QEMU says back.

:class:`Channel` is the narrow interface: ``execute`` a command, ``listen``
for events, read the run ``status``. :class:`ferry.adapters.qemu.QmpChannel`
is the real one; :class:`ferry.testing.qmp.FakeQmp` the scripted one of the
unit tests. QEMU's migration status strings become :class:`MigrationStatus`
here, where they enter, and ``query-migrate`` and ``query-block-jobs``
replies become typed records.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from ferry.core.vmstate import QemuStatus
from ferry.errors import QemuError


class Events(Protocol):
    """Events heard by one ``listen`` block."""

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after ``timeout`` (callers then poll state)."""
        ...


class Channel(Protocol):
    """One QMP connection to one QEMU; every error a :class:`~ferry.errors.QemuError`."""

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...

    def listen(self, *names: str) -> contextlib.AbstractContextManager[Events]:
        """Hear events named ``names`` from now on (register before acting)."""
        ...

    async def status(self) -> QemuStatus: ...


class MigrationStatus(StrEnum):
    """QEMU's ``MigrationStatus`` (QAPI, QEMU 7.2), as ``query-migrate`` says it."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"


S = MigrationStatus
# The incoming side is still loading the stream.
LOADING = frozenset({S.ACTIVE, S.SETUP, S.DEVICE})
# The outgoing side has not let go of the stream yet (a cancel waits for these).
IN_FLIGHT = frozenset({S.ACTIVE, S.SETUP, S.PRE_SWITCHOVER, S.DEVICE, S.CANCELLING,
                       S.WAIT_UNPLUG})  # fmt: skip
# The stream will not complete (post-copy paused: the link broke after the
# switch; ferry does not recover it, see convergence.py).
BROKEN = frozenset({S.FAILED, S.CANCELLED, S.NONE, S.POSTCOPY_PAUSED})


def migration_status(raw: object) -> MigrationStatus:
    try:
        return MigrationStatus(str(raw))
    except ValueError:
        raise QemuError(f"QEMU reports a migration status ferry does not know: {raw!r}") from None


@dataclass(frozen=True)
class MigrationInfo:
    """One ``query-migrate`` reply: where the memory stream is."""

    status: MigrationStatus
    ram_transferred: int = 0
    ram_remaining: int = 0
    ram_total: int = 0
    mbps: float = 0
    dirty_pages_rate: int = 0
    expected_downtime_ms: int | None = None
    downtime_ms: int = 0
    error: str | None = None
    # 0 in a ``completed`` reply until QEMU has worked out the times: QEMU 7.2
    # sets the status first, so a reply read at once has downtime 0 too.
    total_time_ms: int = 0
    # How often QEMU synced the dirty bitmap: past 1 once every page went once.
    dirty_sync_count: int = 0
    postcopy_bytes: int = 0  # sent after the switch to post-copy (0: none happened)

    @classmethod
    def from_qmp(cls, reply: dict[str, Any]) -> MigrationInfo:
        ram = reply.get("ram", {})
        return cls(
            status=migration_status(reply.get("status", "none")),
            ram_transferred=ram.get("transferred", 0),
            ram_remaining=ram.get("remaining", 0),
            ram_total=ram.get("total", 0),
            mbps=ram.get("mbps", 0),
            dirty_pages_rate=ram.get("dirty-pages-rate", 0),
            expected_downtime_ms=reply.get("expected-downtime"),
            downtime_ms=int(reply.get("downtime", 0)),
            total_time_ms=int(reply.get("total-time", 0)),
            error=reply.get("error-desc"),
            dirty_sync_count=int(ram.get("dirty-sync-count", 0)),
            postcopy_bytes=int(ram.get("postcopy-bytes", 0)),
        )


async def query_migrate(channel: Channel) -> MigrationInfo:
    return MigrationInfo.from_qmp(await channel.execute("query-migrate"))


@dataclass(frozen=True)
class BlockJob:
    """One entry of ``query-block-jobs``."""

    device: str
    offset: int
    length: int
    ready: bool

    @classmethod
    def from_qmp(cls, reply: dict[str, Any]) -> BlockJob:
        return cls(str(reply["device"]), int(reply.get("offset", 0)), int(reply.get("len", 0)),
                   bool(reply.get("ready")))  # fmt: skip


async def block_jobs(channel: Channel) -> dict[str, BlockJob]:
    """The block jobs QEMU runs now, by job id."""
    jobs = (BlockJob.from_qmp(j) for j in await channel.execute("query-block-jobs"))
    return {job.device: job for job in jobs}
