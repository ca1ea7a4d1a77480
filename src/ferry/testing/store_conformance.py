"""The conformance suite every ClusterStore must pass: etcd's behaviour, written down as checks.

Each check is ``async def check_...(h: StoreHarness)``; :data:`CHECKS` lists
them. ``tests/unit/test_store_conformance.py`` runs them on a
:class:`ferry.testing.store.MemoryStore`, ``tests/integration/test_etcd_store.py``
on :class:`ferry.adapters.etcd.EtcdStore` against a real etcd, so what the
cluster services rely on holds for both. A check touches only keys under
``h.prefix`` (fresh per check) and compares revisions relative to ones it read,
since a real etcd is shared by every check of a module.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from ferry.core.cluster.store import (
    ClusterStore,
    Compare,
    Delete,
    EventKind,
    Put,
    WatchEvent,
)
from ferry.errors import InvalidInputError, LeaseLostError, StoreUnavailableError

WAIT_S = 10.0  # the longest a check waits for a watch event


class StoreHarness(Protocol):
    store: ClusterStore
    prefix: str  # every key of a check starts with it; ends with "/"

    async def let_expire(self, lease: int) -> None:
        """Let the lease run out on the store's own clock (its keys go)."""
        ...

    async def compact(self, revision: int) -> None:
        """Drop the store's history before ``revision``."""
        ...


Check = Callable[[StoreHarness], Awaitable[None]]


async def _next(events: AsyncIterator[WatchEvent]) -> WatchEvent:
    return await asyncio.wait_for(anext(events), WAIT_S)


async def _take(events: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    return [await _next(events) for _ in range(count)]


async def _raises(error: type[Exception], call: Awaitable[object]) -> str:
    try:
        await call
    except error as exc:
        return str(exc)
    raise AssertionError(f"expected {error.__name__}")


async def check_missing_keys_read_as_nothing(h: StoreHarness) -> None:
    s, p = h.store, h.prefix
    before = await s.revision()
    assert await s.get(p + "none") is None
    assert await s.range(p) == []
    assert await s.delete(p + "none") == 0
    assert await s.delete(p, prefix=True) == 0
    assert await s.revision() == before, "reads and empty deletes use no revision"


async def check_put_bumps_revisions_and_versions(h: StoreHarness) -> None:
    s, k = h.store, h.prefix + "a"
    before = await s.revision()
    first = await s.put(k, b"one")
    assert first == before + 1
    entry = await s.get(k)
    assert entry is not None
    assert (entry.key, entry.value, entry.version, entry.lease) == (k, b"one", 1, 0)
    assert entry.create_revision == entry.mod_revision == first
    second = await s.put(k, b"two")
    assert second == first + 1 == await s.revision()
    entry = await s.get(k)
    assert entry is not None
    assert (entry.value, entry.create_revision, entry.mod_revision, entry.version) == (
        b"two",
        first,
        second,
        2,
    )
    await s.put(k, b"")
    entry = await s.get(k)
    assert entry is not None and entry.value == b"" and entry.version == 3


async def check_range_is_the_prefix_sorted(h: StoreHarness) -> None:
    s, p = h.store, h.prefix
    for key in ("b", "a/2", "a/1", "c", "ä"):
        await s.put(p + key, key.encode())
    await s.put(p.rstrip("/") + "X", b"outside")  # a sibling that shares the text, not the dir
    keys = [e.key for e in await s.range(p)]
    assert keys == [p + k for k in ("a/1", "a/2", "b", "c", "ä")]
    assert [e.value for e in await s.range(p + "a/")] == [b"a/1", b"a/2"]
    assert await s.range(p + "z") == []


async def check_delete_one_key_or_a_prefix(h: StoreHarness) -> None:
    s, p = h.store, h.prefix
    for key in ("x/1", "x/2", "x/3", "y"):
        await s.put(p + key, b"v")
    before = await s.revision()
    assert await s.delete(p + "x/", prefix=True) == 3
    assert await s.revision() == before + 1, "a prefix delete is one revision"
    assert [e.key for e in await s.range(p)] == [p + "y"]
    assert await s.delete(p + "y") == 1
    assert await s.range(p) == []


async def check_txn_compares_revisions_and_values(h: StoreHarness) -> None:
    s, p = h.store, h.prefix
    owner = p + "owner"
    created = await s.txn([Compare.absent(owner)], [Put(owner, b"n1")], [Put(p + "lost", b"1")])
    assert created.succeeded and created.revision == await s.revision()
    entry = await s.get(owner)
    assert entry is not None and entry.value == b"n1"
    again = await s.txn([Compare.absent(owner)], [Put(owner, b"n2")], [Put(p + "lost", b"1")])
    assert not again.succeeded, "the key exists: absent() no longer holds"
    assert (await s.get(p + "lost")) is not None, "the failure branch ran"
    stale = await s.txn([Compare.unchanged(owner, entry.mod_revision - 1)], [Put(owner, b"x")])
    assert not stale.succeeded and stale.revision == await s.revision()
    moved = await s.txn(
        [Compare.unchanged(owner, entry.mod_revision), Compare.holds(owner, b"n1")],
        [Put(owner, b"n3"), Put(p + "since", b"t"), Delete(p + "lost")],
    )
    assert moved.succeeded
    after = await s.get(owner)
    since = await s.get(p + "since")
    assert after is not None and since is not None and after.value == b"n3"
    assert after.mod_revision == since.mod_revision == moved.revision, "one txn, one revision"
    assert await s.get(p + "lost") is None
    assert not (await s.txn([Compare.holds(owner, b"n1")], [Delete(owner)])).succeeded
    assert not (await s.txn([Compare.holds(p + "none", b"")], [])).succeeded
    assert (await s.txn([Compare.unchanged(p + "none", 0)], [])).succeeded


async def check_one_of_two_racing_writers_wins(h: StoreHarness) -> None:
    s, owner = h.store, h.prefix + "owner"
    await s.put(owner, b"old")
    entry = await s.get(owner)
    assert entry is not None
    results = await asyncio.gather(
        *(
            s.txn([Compare.unchanged(owner, entry.mod_revision)], [Put(owner, name)])
            for name in (b"n1", b"n2", b"n3")
        )
    )
    winners = [r for r in results if r.succeeded]
    assert len(winners) == 1
    final = await s.get(owner)
    assert final is not None and final.mod_revision == winners[0].revision


async def check_txn_writing_a_key_twice_is_refused(h: StoreHarness) -> None:
    s, p = h.store, h.prefix
    before = await s.revision()
    await _raises(InvalidInputError, s.txn([], [Put(p + "a", b"1"), Put(p + "a", b"2")]))
    await _raises(InvalidInputError, s.txn([], [Delete(p, prefix=True), Put(p + "a", b"1")]))
    assert await s.revision() == before and await s.range(p) == []


async def check_lease_keeps_keys_until_revoked(h: StoreHarness) -> None:
    s, p = h.store, h.prefix
    lease = await s.grant(30)
    assert lease > 0
    await s.put(p + "alive", b"n1", lease=lease)
    await s.txn([], [Put(p + "leader", b"n1", lease=lease)])
    await s.put(p + "kept", b"no lease")
    entry = await s.get(p + "alive")
    assert entry is not None and entry.lease == lease
    assert await s.keepalive(lease) >= 30
    assert 0 < await s.time_to_live(lease) <= 30
    before = await s.revision()
    await s.revoke(lease)
    assert [e.key for e in await s.range(p)] == [p + "kept"]
    assert await s.revision() == before + 1, "a lease's keys go in one revision"
    assert await s.time_to_live(lease) == -1
    await _raises(LeaseLostError, s.keepalive(lease))
    await s.revoke(lease)  # already gone: no error
    await _raises(LeaseLostError, s.put(p + "alive", b"n1", lease=lease))
    await _raises(LeaseLostError, s.txn([], [Put(p + "alive", b"n1", lease=lease)]))
    assert await s.get(p + "alive") is None
    assert await s.revision() == before + 1, "a refused write changes nothing"


async def check_a_put_without_lease_detaches_it(h: StoreHarness) -> None:
    s, k = h.store, h.prefix + "k"
    lease = await s.grant(30)
    await s.put(k, b"1", lease=lease)
    await s.put(k, b"2")
    await s.revoke(lease)
    entry = await s.get(k)
    assert entry is not None and entry.value == b"2" and entry.lease == 0


async def check_expired_lease_deletes_its_keys(h: StoreHarness) -> None:
    s, p = h.store, h.prefix
    lease = await s.grant(2)
    await s.put(p + "alive/n1", b"x", lease=lease)
    await s.put(p + "alive/n2", b"y", lease=lease)
    start = await s.revision() + 1
    await h.let_expire(lease)
    assert await s.range(p) == []
    assert await s.time_to_live(lease) == -1
    message = await _raises(LeaseLostError, s.keepalive(lease))
    assert f"{lease:x}" in message
    events = s.watch(p, start_revision=start)
    try:
        gone = await _take(events, 2)
    finally:
        await events.aclose()
    assert [(e.kind, e.entry.key) for e in gone] == [
        (EventKind.DELETE, p + "alive/n1"),
        (EventKind.DELETE, p + "alive/n2"),
    ]
    assert gone[0].entry.mod_revision == gone[1].entry.mod_revision == start


async def check_watch_replays_history_in_order(h: StoreHarness) -> None:
    s, p = h.store, h.prefix
    start = await s.revision() + 1
    r1 = await s.put(p + "a", b"1")
    r2 = await s.put(p + "a", b"2")
    await s.put(p.rstrip("/") + "X", b"not under the prefix")
    r3 = await s.delete(p + "a")
    assert r3 == 1
    events = s.watch(p, start_revision=start)
    try:
        seen = await _take(events, 3)
        r4 = await s.put(p + "b", b"live")
        live = await _next(events)
    finally:
        await events.aclose()
    assert [(e.kind, e.entry.key, e.entry.value) for e in seen] == [
        (EventKind.PUT, p + "a", b"1"),
        (EventKind.PUT, p + "a", b"2"),
        (EventKind.DELETE, p + "a", b""),
    ]
    assert [e.entry.mod_revision for e in seen[:2]] == [r1, r2]
    assert seen[1].entry.version == 2 and seen[1].entry.create_revision == r1
    assert seen[2].entry.mod_revision > r2
    assert (live.kind, live.entry.key, live.entry.mod_revision) == (EventKind.PUT, p + "b", r4)


async def check_watch_from_now_skips_the_past(h: StoreHarness) -> None:
    s, p = h.store, h.prefix
    await s.put(p + "old", b"before the watch")
    events = s.watch(p)
    first: asyncio.Task[WatchEvent] = asyncio.ensure_future(_next(events))
    try:
        # The watch starts when first read; keep writing until it has seen one.
        n = 0
        while not first.done():
            n += 1
            await s.put(p + "new", str(n).encode())
            await asyncio.wait({first}, timeout=0.2)
        event = first.result()
        assert event.entry.key == p + "new", f"saw {event.entry.key}"
        rest = [] if event.entry.value == str(n).encode() else await _take(events, 1)
        values = [event.entry.value, *(e.entry.value for e in rest)]
        assert values == sorted(values, key=int), "in order"
    finally:
        if not first.done():
            first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await events.aclose()


async def check_watch_from_a_later_revision_waits_for_it(h: StoreHarness) -> None:
    s, p = h.store, h.prefix
    start = await s.revision() + 3
    events = s.watch(p, start_revision=start)
    try:
        pending = asyncio.ensure_future(_next(events))
        await asyncio.sleep(0.2)  # let the watch open first: the writes then arrive live
        for value in (b"1", b"2", b"3"):  # at start - 2, start - 1, start
            await s.put(p + "a", value)
        event = await pending
    finally:
        await events.aclose()
    assert (event.entry.value, event.entry.mod_revision) == (b"3", start)


async def check_watch_from_compacted_history_fails(h: StoreHarness) -> None:
    s, p = h.store, h.prefix
    start = await s.put(p + "a", b"1")
    await s.put(p + "a", b"2")
    await h.compact(await s.revision())
    events = s.watch(p, start_revision=start)
    try:
        message = await _raises(StoreUnavailableError, _next(events))
    finally:
        await events.aclose()
    assert "compacted" in message


async def check_lease_ttl_must_be_positive(h: StoreHarness) -> None:
    await _raises(InvalidInputError, h.store.grant(0))


CHECKS: list[Check] = [
    check_missing_keys_read_as_nothing,
    check_put_bumps_revisions_and_versions,
    check_range_is_the_prefix_sorted,
    check_delete_one_key_or_a_prefix,
    check_txn_compares_revisions_and_values,
    check_one_of_two_racing_writers_wins,
    check_txn_writing_a_key_twice_is_refused,
    check_lease_keeps_keys_until_revoked,
    check_a_put_without_lease_detaches_it,
    check_expired_lease_deletes_its_keys,
    check_watch_replays_history_in_order,
    check_watch_from_now_skips_the_past,
    check_watch_from_a_later_revision_waits_for_it,
    check_watch_from_compacted_history_fails,
    check_lease_ttl_must_be_positive,
]
