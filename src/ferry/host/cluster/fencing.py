"""The node's lease keeper: renew the lease, beat the guard, fence itself when it cannot.

Theory of operation (the timings and why they are safe are in
:mod:`ferry.core.cluster.timing`). :class:`LeaseKeeper` renews the node's
lease every ``renew_interval_s`` (a failed attempt is retried after
``retry_interval_s``), each attempt bounded so that it never runs past the
self-fence deadline. It keeps the *send* time of its last successful
renewal, by a monotonic clock: etcd received that keepalive no earlier, so the
lease lives at least ``ttl_s`` past it. When ``self_fence_s`` has passed since
then without another success (etcd out of reach, answering too slowly, or the
event loop stalled so that nothing could be sent), the keeper *fences*: the
fence callback SIGKILLs the node's clustered QEMUs (by pid, checking the UUID on
the command line) before etcd can expire the lease and the leader restart them
elsewhere. A lease that etcd says is gone is fenced for at once.

After a successful renewal the keeper beats the fence guard and tells it which
QEMUs to protect: if this loop stops (the agent died or hangs), the guard kills
them instead. The event loop's lag is measured at every wake-up and reported
when it passes ``loop_lag_limit_s``; a stalled loop sends no renewal, so its
time counts against the deadline like a failed one.

Once fenced, the node rejoins only when etcd answers again, and only with a new
lease: it writes ``fenced/<node>`` (``{"at", "reason", "killed"}``), revokes the
old lease if etcd still has it (its leader key and alive record go with it),
stays without an alive record for two leader polls (so the leader sees it lost
and restarts its VMs elsewhere), and asks the membership for a new one.
The node counts as fenced (nothing is placed on it) until its new alive
record is there: the mark stays as the record of the fence, older than that
alive record (see :mod:`ferry.core.cluster.nodes`), until a reconnect or
``cluster resume`` removes it. Which VMs it may run again is the reconciler's
business (only those it still owns), never this module's.

:class:`NodeFencing` is what the agent composes: the host's one guard client,
a keeper per membership (``keep`` is the membership's lease task), the
clustered QEMUs to protect, ``holds_lease`` for starts, and ``protect_now`` for
a clustered QEMU just launched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from ferry.adapters import qemu
from ferry.core.clock import Clock, SystemClock
from ferry.core.tasks import cancel_and_wait
from ferry.errors import FerryError, LeaseLostError, QemuError
from ferry.host.cluster.guard_client import FenceGuardClient
from ferry.host.cluster.membership import Membership
from ferry.host.metrics.recorder import NO_METRICS, MetricEvents

log = logging.getLogger(__name__)

FENCED_EVENT = "node-fenced"
# How long a beat or a protect to the local guard may hold the keeper's loop.
GUARD_CALL_S = 0.5

# reason -> the uuids of the QEMUs it killed
Fence = Callable[[str], Awaitable[Sequence[str]]]
# uuid -> pid of every clustered QEMU running on this node now
Protected = Callable[[], dict[str, int]]


class MonotonicClock(SystemClock):
    """The event loop's timers with a clock that NTP does not move (for deadlines)."""

    def time(self) -> float:
        return time.monotonic()


class Guard(Protocol):
    """What the keeper needs of the fence guard (:class:`FenceGuardClient`)."""

    async def beat(self) -> None: ...

    async def sync(self, wanted: dict[str, int]) -> None: ...


def qemu_killer(protected: Protected) -> Fence:
    """The fence callback: SIGKILL every protected QEMU that still runs its VM, and wait.

    Raises QemuError naming those that did not die (a process stuck in the kernel).
    """

    async def fence(reason: str) -> list[str]:
        victims = protected()
        results = await asyncio.gather(
            *(qemu.kill_process(pid, uuid) for uuid, pid in victims.items()),
            return_exceptions=True,
        )
        killed, failed = [], []
        for (uuid, pid), result in zip(victims.items(), results, strict=True):
            if isinstance(result, BaseException):
                failed.append(f"pid {pid} of VM {uuid}: {result}")
            else:
                killed.append(uuid)
        if failed:
            raise QemuError(f"fencing ({reason}): " + "; ".join(failed))
        return killed

    return fence


class LeaseKeeper:
    """Keeps one membership's lease; see the module docstring."""

    def __init__(
        self,
        membership: Membership,
        *,
        fence: Fence,
        guard: Guard | None = None,
        protected: Protected = dict,
        clock: Clock | None = None,
        metrics: MetricEvents = NO_METRICS,
    ) -> None:
        self.membership = membership
        self.metrics = metrics  # counts renewals and fences
        self.timings = membership.timings
        self.fence_callback = fence
        self.guard = guard
        self.protected = protected
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.last_renewed = self.clock.time()  # send time of the last successful renewal
        self.fenced: str | None = None  # the reason, while fenced and not yet rejoined
        self.fences = 0
        self.max_lag_s = 0.0
        self._killed: list[str] = []
        self._all_killed = True
        self._never = asyncio.Event()  # the keeper waits on its clock; cancel it to stop
        self._guard_down: str | None = None
        self.log = log.getChild(f"{membership.cluster}.{membership.node}")

    def holds_lease(self) -> bool:
        """Whether this node may run clustered VMs now: not fenced, lease renewed in time."""
        age = self.clock.time() - self.last_renewed
        return self.fenced is None and age < self.timings.self_fence_s

    def deadline(self) -> float:
        return self.last_renewed + self.timings.self_fence_s

    async def run(self) -> None:
        """Renew until cancelled (what :class:`NodeLoops` runs as the lease task)."""
        # The membership granted or renewed the lease just before this starts;
        # the guard, beaten by the agent before, covers the moments between.
        t = self.timings
        self.last_renewed = self.clock.time()
        wake = self.clock.time()
        while True:
            until = wake if self.fenced is not None else min(wake, self.deadline())
            if until > self.clock.time():
                await self.clock.wait(self._never, until - self.clock.time())
            else:
                await asyncio.sleep(0)
            now = self.clock.time()
            lag = now - until
            self.max_lag_s = max(self.max_lag_s, lag)
            if lag > t.loop_lag_limit_s:
                self.log.warning("the event loop stalled %.2fs (limit %.2fs): no renewal could "
                                 "be sent meanwhile", lag, t.loop_lag_limit_s)  # fmt: skip
            if now >= wake:
                # On the planned beat (no drift), unless the loop fell a whole interval behind.
                late = now - wake >= t.renew_interval_s
                wake = (now if late else wake) + t.renew_interval_s
                renewed = await self.renew_once()
                self.metrics.lease_renewal(self.membership.cluster, ok=renewed)
                if self.clock.time() >= wake:  # a rejoin took its time
                    wake = self.clock.time() + t.renew_interval_s
                if not renewed and self.fenced is None:
                    wake = min(wake, self.clock.time() + t.retry_interval_s)
            if self.fenced is None and self.clock.time() >= self.deadline():
                age = self.clock.time() - self.last_renewed
                await self.fence(f"no lease renewal for {age:.1f}s (self-fence deadline "
                                 f"{t.self_fence_s:g}s, TTL {t.ttl_s}s)")  # fmt: skip
                wake = self.clock.time()  # try to rejoin at once

    async def renew_once(self) -> bool:
        """One renewal attempt (and, once fenced, the rejoin); True if etcd renewed it."""
        m = self.membership
        sent = self.clock.time()
        budget = self.timings.renew_timeout_s
        if self.fenced is None:
            budget = min(budget, self.deadline() - sent)
        try:
            await self._bounded(m.store.keepalive(m.lease), budget)
        except LeaseLostError:
            if self.fenced is None:
                await self.fence(f"etcd says lease {m.lease:x} is gone")
            await self._rejoin()
            return False
        except (FerryError, TimeoutError) as exc:
            self.log.debug("lease renewal failed: %s", exc or "timed out")
            return False
        if self.fenced is not None:
            await self._rejoin()
            return False
        self.last_renewed = sent
        await self._feed_guard()
        return True

    async def _bounded(self, call: Coroutine[Any, Any, Any], budget: float) -> None:
        """Await ``call`` for at most ``budget`` seconds of the keeper's clock."""
        if budget <= 0:
            call.close()
            raise TimeoutError
        task = asyncio.ensure_future(call)
        finished = asyncio.Event()
        task.add_done_callback(lambda _: finished.set())
        if not await self.clock.wait(finished, budget):
            await cancel_and_wait(task)
            raise TimeoutError
        task.result()

    async def fence(self, reason: str) -> None:
        """Kill this node's clustered QEMUs now; the rejoin waits for etcd."""
        self.fenced = reason
        self.fences += 1
        self.metrics.fenced(self.membership.cluster)
        self.log.error("fencing this node: %s", reason)
        await self._kill(reason)

    async def _kill(self, reason: str) -> bool:
        """Run the fence callback; True once no clustered QEMU is left running here."""
        try:
            killed = await self.fence_callback(reason)
        except FerryError as exc:
            # The guard keeps its list and gets no beat while fenced: it tries
            # too; the rejoin waits until every QEMU is gone.
            self.log.error("fencing: a clustered QEMU survived its SIGKILL: %s", exc)
            self._all_killed = False
            return False
        self._killed = sorted(set(self._killed) | set(killed))
        self._all_killed = True
        self.log.error("fenced: killed %d clustered QEMU(s) %s", len(killed), sorted(killed))
        return True

    async def _rejoin(self) -> None:
        """Etcd answers again after a fence: mark fenced, retire the old lease, take a new one."""
        m = self.membership
        reason = self.fenced or "the lease was lost"
        # Nothing may show this node lost while one of its QEMUs might still run.
        if not self._all_killed and not await self._kill(reason):
            return
        record = {"at": m.clock(), "reason": reason, "killed": self._killed}
        try:
            await m.store.put(m.keys.fenced(m.node), json.dumps(record).encode())
            await m.store.revoke(m.lease)
            # Stay without an alive record for two leader polls, so the leader
            # sees this node lost (even if etcd had not expired the lease yet)
            # and restarts its VMs elsewhere: a fenced node starts none itself.
            await self.clock.wait(self._never, 2 * self.timings.leader_poll_s)
            await m.regrant()
        except (FerryError, TimeoutError) as exc:
            self.log.warning("cannot rejoin after fencing yet: %s", exc)
            return
        self.fenced = None
        self._killed = []
        self.last_renewed = self.clock.time()
        self.log.warning("rejoined with lease %x after fencing (%s)", m.lease, reason)
        try:
            await m.record_event(FENCED_EVENT, node=m.node, reason=reason)
        except FerryError as exc:
            self.log.warning("cannot record the fencing event: %s", exc)
        await self._feed_guard()

    async def _feed_guard(self) -> None:
        if self.guard is not None:
            await self._guarded_guard_call(self.guard.sync(self.protected()))
            await self._guarded_guard_call(self.guard.beat())

    async def _guarded_guard_call(self, call: Awaitable[None]) -> None:
        """A guard call, bounded; a guard that fails is reported once until it works again."""
        try:
            async with asyncio.timeout(GUARD_CALL_S):
                await call
        except (FerryError, TimeoutError) as exc:
            text = str(exc) or "timed out"
            if self._guard_down != text:
                self._guard_down = text
                self.log.error("the fence guard does not answer: %s", text)
            return
        if self._guard_down is not None:
            self._guard_down = None
            self.log.info("the fence guard answers again")


class NodeFencing:
    """The agent's fencing: its host's one guard client and a keeper per membership.

    ``keep`` is what :class:`~ferry.host.cluster.service.ClusterService` runs as
    a membership's lease task; ``protected`` names the clustered QEMUs running
    here (set by the composition once the clustered-VM service exists).
    """

    def __init__(self, guard: FenceGuardClient | None, *, clock: Clock | None = None) -> None:
        self.guard = guard
        self.clock = clock
        self.protected: Protected = dict
        self.keeper: LeaseKeeper | None = None
        self.metrics: MetricEvents = NO_METRICS  # the agent's, handed to each keeper

    def holds_lease(self) -> bool:
        return self.keeper is not None and self.keeper.holds_lease()

    async def keep(self, membership: Membership) -> None:
        if self.guard is not None:
            try:
                pid = await self.guard.ensure_running()
                log.info("fence guard pid %d protects this node's clustered QEMUs", pid)
            except FerryError as exc:  # the keeper still fences itself; beats retry
                log.error("cannot start the fence guard: %s", exc)
        keeper = LeaseKeeper(membership, fence=qemu_killer(lambda: self.protected()),
                             guard=self.guard, protected=lambda: self.protected(),
                             clock=self.clock, metrics=self.metrics)  # fmt: skip
        self.keeper = keeper
        try:
            await keeper.run()
        finally:
            if self.keeper is keeper:
                self.keeper = None

    async def protect_now(self, uuid: str, pid: int) -> None:
        """Protect a clustered QEMU that just started, before the keeper's next sync."""
        if self.guard is not None:
            try:
                await self.guard.protect(uuid, pid)
            except FerryError as exc:
                log.error("the fence guard cannot protect VM %s (pid %d): %s", uuid, pid, exc)

    async def on_membership(self, membership: Membership | None) -> None:
        """The cluster context's listener: after a leave, nothing is ours to fence."""
        if membership is None and self.guard is not None:
            try:
                await self.guard.disarm()
            except FerryError as exc:
                log.warning("cannot disarm the fence guard: %s", exc)

    async def close(self) -> None:
        """On agent stop: let go of the guard, which stays armed (by design)."""
        if self.guard is not None:
            await self.guard.close()
