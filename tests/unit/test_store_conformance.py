"""The store conformance suite on the in-memory store, and the memory store's own test hooks.

The same checks run on a real etcd in ``tests/integration/test_etcd_store.py``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from ferry.core.cluster.store import EventKind
from ferry.errors import StoreUnavailableError
from ferry.testing.clock import FakeClock
from ferry.testing.store import MemoryStore
from ferry.testing.store_conformance import CHECKS, Check


@dataclass
class MemoryHarness:
    store: MemoryStore
    clock: FakeClock
    prefix: str = "/conformance/"

    async def let_expire(self, lease: int) -> None:
        self.clock.advance(await self.store.time_to_live(lease) + 1)
        await self.clock.settle()

    async def compact(self, revision: int) -> None:
        self.store.compact(revision)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_memory_store_conforms(check: Check) -> None:
    async def run() -> None:
        clock = FakeClock()
        store = MemoryStore(clock)
        try:
            await check(MemoryHarness(store, clock))
        finally:
            await store.close()

    asyncio.run(run())


def test_leases_expire_when_the_fake_clock_passes_their_ttl() -> None:
    """No call is needed: the store's reaper wakes on the fake clock, as etcd's own clock."""

    async def run() -> None:
        clock = FakeClock()
        store = MemoryStore(clock)
        lease = await store.grant(4)
        await store.put("/c/alive/n1", b"x", lease=lease)
        events = store.watch("/c/alive/")
        nxt = asyncio.ensure_future(anext(events))
        await clock.settle()
        clock.advance(3)
        await clock.settle()
        assert not nxt.done(), "not yet: 3 of 4 s"
        assert await store.keepalive(lease) == 4  # renewed at t=3: runs to t=7
        clock.advance(3.5)
        await clock.settle()
        assert not nxt.done()
        clock.advance(0.5)
        await clock.settle()
        event = await asyncio.wait_for(nxt, 1)
        assert (event.kind, event.entry.key) == (EventKind.DELETE, "/c/alive/n1")
        assert await store.time_to_live(lease) == -1
        await events.aclose()
        await store.close()

    asyncio.run(run())


def test_expire_ends_a_lease_at_once() -> None:
    async def run() -> None:
        store = MemoryStore(FakeClock())
        lease = await store.grant(60)
        await store.put("/c/leader", b"n1", lease=lease)
        store.expire(lease)
        assert await store.get("/c/leader") is None
        await store.close()

    asyncio.run(run())


def test_an_unavailable_store_fails_every_call_and_open_watch() -> None:
    async def run() -> None:
        store = MemoryStore(FakeClock())
        await store.put("/c/a", b"1")
        events = store.watch("/c/")
        nxt = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)
        store.set_available(False)
        with pytest.raises(StoreUnavailableError, match="memory://"):
            await asyncio.wait_for(nxt, 1)
        for call in (store.get("/c/a"), store.put("/c/a", b"2"), store.grant(5)):
            with pytest.raises(StoreUnavailableError, match="memory://"):
                await call
        store.set_available(True)
        entry = await store.get("/c/a")
        assert entry is not None and entry.value == b"1", "nothing changed while it was out"
        await store.close()

    asyncio.run(run())
