"""The narrow store interface a cluster keeps its state in (etcd v3 in production).

Host services see only this :class:`ClusterStore` protocol: keys and values,
revisions, transactions that compare revisions, leases and watches. The real
implementation is :class:`ferry.adapters.etcd.EtcdStore` (etcd's JSON gateway
over mutual TLS); :class:`ferry.testing.store.MemoryStore` is the in-memory one
for unit tests. One conformance suite runs against both
(``tests/unit/test_store_conformance.py`` with the memory store,
``tests/integration/test_etcd_store.py`` with a real etcd), so a behaviour the
services rely on is a behaviour of etcd.

Semantics (etcd's):

- Every change bumps the store's ``revision`` by one; an entry carries the
  revision that created it (``create_revision``) and last changed it
  (``mod_revision``). A missing key has both 0.
- A transaction compares, then applies ``success`` ops if every compare holds,
  else ``failure`` ops; all at one revision. Ownership changes only through
  one (compare-and-swap on ``mod_revision``), so at most one writer wins.
- A lease has a TTL in whole seconds, kept alive by ``keepalive``; when the
  store's own clock lets it expire, every key put with it is deleted (a
  ``delete`` watch event). No client clock is trusted.
- ``watch`` yields the changes under a prefix from a revision on, in order.

Keys are text; values are bytes (the services store JSON).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int  # number of changes since creation
    lease: int = 0  # 0: none


class Target(StrEnum):
    MOD = "mod"  # compare mod_revision
    CREATE = "create"  # compare create_revision (0: absent)
    VALUE = "value"  # compare the value's bytes


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction: ``key``'s ``target`` equals ``value``."""

    key: str
    target: Target
    value: int | bytes

    @classmethod
    def absent(cls, key: str) -> Compare:
        return cls(key, Target.CREATE, 0)

    @classmethod
    def unchanged(cls, key: str, mod_revision: int) -> Compare:
        """The key is still at ``mod_revision`` (0: still absent)."""
        return cls(key, Target.MOD, mod_revision)

    @classmethod
    def holds(cls, key: str, value: bytes) -> Compare:
        return cls(key, Target.VALUE, value)


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False  # delete every key under ``key`` as a prefix


Op = Put | Delete


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store's revision after the transaction


class EventKind(StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    kind: EventKind
    entry: Entry  # for a delete: key and mod_revision of the deletion, value b""


class ClusterStore(Protocol):
    """What a cluster's services need of etcd; see the module docstring."""

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Where the store is (URLs), for messages."""
        ...

    async def get(self, key: str) -> Entry | None: ...

    async def range(self, prefix: str) -> list[Entry]:
        """Every entry whose key starts with ``prefix``, sorted by key."""
        ...

    async def revision(self) -> int:
        """The store's current revision."""
        ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Set ``key``; returns the new revision."""
        ...

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Remove ``key`` (or every key under it); returns how many went."""
        ...

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult: ...

    async def grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; returns its id."""
        ...

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; returns its TTL. Raises LeaseLostError if it expired."""
        ...

    async def time_to_live(self, lease: int) -> int:
        """Seconds left on ``lease``; -1 if it expired or never was."""
        ...

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now (its keys go); no error if it is already gone."""
        ...

    def watch(self, prefix: str, *, start_revision: int = 0) -> AsyncGenerator[WatchEvent, None]:
        """Changes under ``prefix`` from ``start_revision`` (0: from now), in order.

        An async generator: ``async with contextlib.aclosing(store.watch(p)) as events``
        ends its stream as soon as the caller leaves the loop (else only at GC).
        """
        ...

    async def close(self) -> None: ...
