"""An in-memory cluster store with etcd's semantics, for unit tests of cluster services.

:class:`MemoryStore` implements :class:`ferry.core.cluster.store.ClusterStore`
the way etcd does (the conformance suite in
:mod:`ferry.testing.store_conformance` holds both to it): one revision counter,
transactions at one revision, leases that expire on the store's clock (a
:class:`ferry.testing.clock.FakeClock` in tests: ``clock.advance(s)`` then
``await clock.settle()``) or at once by :meth:`MemoryStore.expire`, and watches
that replay history from a revision. Test hooks: ``available = False`` makes
every call (and every open watch) fail with StoreUnavailableError, as an etcd
out of reach does; :meth:`compact` drops history as etcd's compaction does.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from ferry.core.clock import SYSTEM_CLOCK, Clock
from ferry.core.cluster.store import (
    Compare,
    Delete,
    Entry,
    EventKind,
    Op,
    Put,
    Target,
    TxnResult,
    WatchEvent,
)
from ferry.core.tasks import cancel_and_wait
from ferry.errors import InvalidInputError, LeaseLostError, StoreUnavailableError

URL = "memory://cluster-store"


@dataclass
class _Lease:
    ttl: int
    deadline: float


class _Outage:
    """Put into a watcher's queue when the store becomes unavailable."""


class MemoryStore:
    """A ClusterStore in memory; see the module docstring."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
        self.available = True
        self._revision = 1  # a fresh etcd is at revision 1
        self._data: dict[str, Entry] = {}
        self._leases: dict[int, _Lease] = {}
        self._history: list[WatchEvent] = []
        self._compacted = 0
        self._watchers: list[tuple[str, asyncio.Queue[WatchEvent | _Outage]]] = []
        self._lease_ids = itertools.count(0x7E11_0000_0001)
        self._reaper: asyncio.Task[None] | None = None
        self._deadlines_changed = asyncio.Event()

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (URL,)

    def set_available(self, available: bool) -> None:
        """Cut the store off (every call fails, open watches end) or bring it back."""
        self.available = available
        if not available:
            for _, queue in self._watchers:
                queue.put_nowait(_Outage())

    def _check(self, what: str) -> None:
        if not self.available:
            raise StoreUnavailableError(
                f"cannot reach the cluster store for {what}: {URL}: unavailable (test)"
            )
        self.expire_due()

    # -- changes -------------------------------------------------------------

    def _publish(self, events: list[WatchEvent]) -> None:
        self._history += events
        for event in events:
            for prefix, queue in self._watchers:
                if event.entry.key.startswith(prefix):
                    queue.put_nowait(event)

    def _apply(self, ops: Sequence[Op], revision: int) -> list[WatchEvent]:
        events = []
        for op in ops:
            if isinstance(op, Put):
                old = self._data.get(op.key)
                entry = Entry(
                    key=op.key,
                    value=op.value,
                    create_revision=old.create_revision if old else revision,
                    mod_revision=revision,
                    version=old.version + 1 if old else 1,
                    lease=op.lease,
                )
                self._data[op.key] = entry
                events.append(WatchEvent(EventKind.PUT, entry))
            else:
                for key in self._matching(op.key, op.prefix):
                    del self._data[key]
                    gone = Entry(key, b"", 0, revision, 0)
                    events.append(WatchEvent(EventKind.DELETE, gone))
        return events

    def _commit(self, ops: Sequence[Op]) -> int:
        """Apply ``ops`` at the next revision (no revision is used if nothing changes)."""
        events = self._apply(ops, self._revision + 1)
        if events:
            self._revision += 1
            self._publish(events)
        return self._revision

    def _matching(self, key: str, prefix: bool) -> list[str]:
        if not prefix:
            return [key] if key in self._data else []
        return sorted(k for k in self._data if k.startswith(key))

    def _check_leases(self, ops: Sequence[Op], what: str) -> None:
        for op in ops:
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise LeaseLostError(
                    f"{URL}: {what}: the lease is gone (requested lease not found)"
                )

    # -- keys ----------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        self._check(f"read {key}")
        return self._data.get(key)

    async def range(self, prefix: str) -> list[Entry]:
        self._check(f"read {prefix}*")
        return [self._data[k] for k in self._matching(prefix, True)]

    async def revision(self) -> int:
        self._check("read the revision")
        return self._revision

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        op = Put(key, value, lease)
        self._check(f"write {key}")
        self._check_leases([op], f"write {key}")
        return self._commit([op])

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        self._check(f"delete {key}")
        count = len(self._matching(key, prefix))
        self._commit([Delete(key, prefix)])
        return count

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        what = f"transaction on {', '.join(sorted({c.key for c in compares})) or 'no keys'}"
        self._check(what)
        for ops in (success, failure):
            _check_distinct(ops)
        succeeded = all(self._holds(c) for c in compares)
        ops = success if succeeded else failure
        self._check_leases(ops, what)
        return TxnResult(succeeded, self._commit(ops))

    def _holds(self, compare: Compare) -> bool:
        entry = self._data.get(compare.key)
        if compare.target is Target.VALUE:
            return entry is not None and entry.value == compare.value
        if compare.target is Target.MOD:
            return (entry.mod_revision if entry else 0) == compare.value
        return (entry.create_revision if entry else 0) == compare.value

    # -- leases --------------------------------------------------------------

    async def grant(self, ttl_s: int) -> int:
        if ttl_s < 1:
            raise InvalidInputError(f"a lease TTL is at least 1 s, not {ttl_s}")
        self._check(f"grant a {ttl_s} s lease")
        lease = next(self._lease_ids)
        self._leases[lease] = _Lease(ttl_s, self.clock.time() + ttl_s)
        self._ensure_reaper()
        return lease

    async def keepalive(self, lease: int) -> int:
        self._check(f"renew lease {lease:x}")
        held = self._leases.get(lease)
        if held is None:
            raise LeaseLostError(f"lease {lease:x} expired or was revoked; etcd did not renew it")
        held.deadline = self.clock.time() + held.ttl
        self._deadlines_changed.set()
        return held.ttl

    async def time_to_live(self, lease: int) -> int:
        self._check(f"read lease {lease:x}")
        held = self._leases.get(lease)
        return -1 if held is None else max(0, int(held.deadline - self.clock.time()))

    async def revoke(self, lease: int) -> None:
        self._check(f"revoke lease {lease:x}")
        self._end_lease(lease)

    def expire(self, lease: int) -> None:
        """Let ``lease`` run out now, as etcd's own clock would: its keys go."""
        self._end_lease(lease)

    def expire_due(self) -> None:
        """End every lease whose deadline on the store's clock has passed."""
        now = self.clock.time()
        for lease, held in list(self._leases.items()):
            if held.deadline <= now:
                self._end_lease(lease)

    def _end_lease(self, lease: int) -> None:
        if self._leases.pop(lease, None) is None:
            return
        keys = sorted(k for k, e in self._data.items() if e.lease == lease)
        self._commit([Delete(k) for k in keys])  # one revision, as etcd's revoke

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Expire leases when the clock reaches their deadlines (a FakeClock's too)."""
        while self._leases:
            self._deadlines_changed.clear()
            first = min(held.deadline for held in self._leases.values())
            await self.clock.wait(self._deadlines_changed, max(0.0, first - self.clock.time()))
            self.expire_due()

    # -- watch and history ---------------------------------------------------

    def compact(self, revision: int) -> None:
        """Forget the history before ``revision`` (watches from before it fail)."""
        self._compacted = max(self._compacted, revision)
        self._history = [e for e in self._history if e.entry.mod_revision >= revision]

    async def watch(
        self, prefix: str, *, start_revision: int = 0
    ) -> AsyncGenerator[WatchEvent, None]:
        self._check(f"watch {prefix}")
        if start_revision and start_revision < self._compacted:
            raise StoreUnavailableError(
                f"{URL} compacted the history of {prefix} up to revision {self._compacted}, "
                f"past the watch's {start_revision}: read again and watch from there"
            )
        queue: asyncio.Queue[WatchEvent | _Outage] = asyncio.Queue()
        if start_revision:
            for event in self._history:
                if event.entry.mod_revision >= start_revision and event.entry.key.startswith(
                    prefix
                ):
                    queue.put_nowait(event)
        watcher = (prefix, queue)
        self._watchers.append(watcher)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Outage):
                    raise StoreUnavailableError(
                        f"cannot watch {prefix} in the cluster store: {URL}: unavailable (test)"
                    )
                if item.entry.mod_revision >= start_revision:  # a start in the future waits
                    yield item
        finally:
            self._watchers.remove(watcher)

    async def close(self) -> None:
        if self._reaper is not None:
            await cancel_and_wait(self._reaper)
            self._reaper = None


def _check_distinct(ops: Sequence[Op]) -> None:
    """etcd refuses a transaction branch that writes one key twice."""
    puts = [op.key for op in ops if isinstance(op, Put)]
    deletes = [op for op in ops if isinstance(op, Delete)]
    twice = len(set(puts)) != len(puts) or any(
        key == d.key or (d.prefix and key.startswith(d.key)) for key in puts for d in deletes
    )
    if twice:
        raise InvalidInputError("the cluster store refused a transaction: duplicate key given")
