"""The background work of a cluster node: its lease, its alive record, the election, HA.

The tasks of a membership, each of which survives a store that does not
answer (it logs and tries again next round):

- the lease: :class:`ferry.host.cluster.fencing.LeaseKeeper` when the agent
  gives one (it renews and fences), else :meth:`NodeLoops._renew_lease`, a
  plain renewal loop without fencing for unit tests and tools;
- ``alive/<node>``: put again every :data:`ALIVE_REFRESH_S` with what the node
  has free, so placement reads fresh numbers (and ``meta`` read again);
- the election each ``leader_poll_s`` and, while this node leads, one HA pass
  after it (:class:`ferry.host.cluster.ha.HaLeader`); two watches (on the
  ``alive/`` records and the leader key) start the next round at once when
  one is deleted, so a lost node or leader costs no poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from ferry.core.cluster.store import EventKind
from ferry.core.tasks import cancel_and_wait
from ferry.errors import FerryError, LeaseLostError
from ferry.host.cluster.election import LeaderElection
from ferry.host.cluster.membership import Membership

log = logging.getLogger(__name__)

ALIVE_REFRESH_S = 5.0


class LeaderWork(Protocol):
    """What the leader does each round (the HA pass)."""

    async def pass_once(self) -> Any: ...


class NodeLoops:
    """Runs (and stops) the tasks of one membership; see the module docstring."""

    def __init__(
        self,
        membership: Membership,
        *,
        leader_work: LeaderWork | None = None,
        lease_keeper: Callable[[Membership], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.membership = membership
        self.election = LeaderElection(membership)
        self.leader_work = leader_work
        self.lease_keeper = lease_keeper
        self._tasks: list[asyncio.Task[None]] = []
        self._complaints: dict[str, str] = {}
        self._wake = asyncio.Event()

    def start(self) -> None:
        m = self.membership
        keeper = self.lease_keeper(m) if self.lease_keeper is not None else self._renew_lease()
        self._tasks = [
            asyncio.create_task(keeper, name=f"cluster-lease-{m.node}"),
            asyncio.create_task(self._refresh_alive(), name=f"cluster-alive-{m.node}"),
            asyncio.create_task(self._lead(), name=f"cluster-leader-{m.node}"),
            asyncio.create_task(self._watch_deletes(m.keys.alive_prefix),
                                name=f"cluster-watch-alive-{m.node}"),
            asyncio.create_task(self._watch_deletes(m.keys.leader),
                                name=f"cluster-watch-leader-{m.node}"),
        ]  # fmt: skip

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(*tasks)
        self.membership.set_leader(False)

    async def lead_once(self) -> bool:
        """One election round and, when leading, one HA pass (what :meth:`_lead` repeats)."""
        leading = await self.election.campaign()
        if leading and self.leader_work is not None:
            await self.leader_work.pass_once()
        return leading

    def _complain(self, what: str, exc: Exception) -> None:
        """Log a failure once per kind until it changes (a store that is away for a while)."""
        text = str(exc)
        if self._complaints.get(what) != text:
            self._complaints[what] = text
            log.warning("cluster %s, node %s: %s failed: %s", self.membership.cluster,
                        self.membership.node, what, text)  # fmt: skip

    def _recovered(self, what: str) -> None:
        if self._complaints.pop(what, None) is not None:
            log.info("cluster %s, node %s: %s works again", self.membership.cluster,
                     self.membership.node, what)  # fmt: skip

    async def _renew_lease(self) -> None:
        """Renew every ``renew_interval_s``; a lost lease is regranted. No fencing here."""
        m = self.membership
        while True:
            await asyncio.sleep(m.timings.renew_interval_s)
            try:
                async with asyncio.timeout(m.timings.renew_timeout_s):
                    await m.store.keepalive(m.lease)
                self._recovered("lease renewal")
            except LeaseLostError:
                await self._guarded("lease regrant", m.on_lease_lost)
            except (FerryError, TimeoutError) as exc:
                self._complain("lease renewal", exc)

    async def _guarded(self, what: str, action: Callable[[], Awaitable[Any]]) -> None:
        try:
            await action()
            self._recovered(what)
        except asyncio.CancelledError:
            raise
        except FerryError as exc:
            self._complain(what, exc)
        except Exception:  # a bug must not end the node's loops
            log.exception("cluster %s: %s", self.membership.cluster, what)

    async def _refresh_alive(self) -> None:
        """Put ``alive`` again (fresh numbers) and re-read ``meta`` (its level may rise)."""
        while True:
            await asyncio.sleep(ALIVE_REFRESH_S)
            await self._guarded("alive refresh", self.membership.put_alive)
            await self._guarded("meta refresh", self.membership.refresh_meta)

    async def _lead(self) -> None:
        while True:
            self._wake.clear()
            await self._guarded("election", self.lead_once)
            # The next round at the poll, or at once when an alive record or the
            # leader key goes (a watch; the poll alone is enough if it breaks).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.membership.timings.leader_poll_s):
                    await self._wake.wait()

    async def _watch_deletes(self, prefix: str) -> None:
        """Set the wake-up on each delete under ``prefix``; a broken watch is opened again."""
        m = self.membership
        while True:
            try:
                async for event in m.store.watch(prefix):
                    if event.kind is EventKind.DELETE:
                        self._wake.set()
            except FerryError as exc:
                self._complain(f"watch of {prefix}", exc)
            await asyncio.sleep(m.timings.leader_poll_s)
