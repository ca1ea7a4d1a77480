"""The certificate pins this host keeps for its partners, and following a partner's renewal.

Pins live in three records: a primary's relationship pins its replica host,
a replica's relationship pins its primary (failover asks through the same
relationships), and an extension pins the extended host. When a partner
renews its certificate (:mod:`ferry.peer.renewal`), every pin of its name
that holds the old thumbprint is rewritten at once, and again under the
record's lock once whatever held it is done: a replication cycle in flight
writes back its own copy of the relationship when it ends, old pin and all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from ferry.adapters.catalog import Catalog
from ferry.core.relationship import Role

log = logging.getLogger(__name__)

RENEWAL_TURN = "a certificate renewal"  # what a VM's disk turn is held for (host/turns.py)

Lock = Callable[[str], AbstractAsyncContextManager[None]]


@dataclass(frozen=True)
class Partner:
    """A host this one keeps a pin for, where it is reached, and the pin."""

    name: str
    url: str
    pin: str


class PinFollower:
    """Rewrites the pins of a renewed partner (``locks``: by record kind, of one VM)."""

    def __init__(self, catalog: Catalog, *, primary_lock: Lock, replica_lock: Lock,
                 extension_lock: Lock) -> None:  # fmt: skip
        self.catalog = catalog
        self._locks = {"primary": primary_lock, "replica": replica_lock,
                       "extension": extension_lock}  # fmt: skip
        self._settling: set[asyncio.Task[None]] = set()

    def partners(self) -> list[Partner]:
        """Every host a record here pins, once each (the first address found)."""
        found: dict[str, Partner] = {}
        for rel in self.catalog.relationships():
            if rel.role is Role.PRIMARY:
                partner = Partner(rel.replica, rel.replica_url, rel.thumbprint)
            else:
                partner = Partner(rel.primary, rel.primary_url, rel.thumbprint)
            if partner.url:
                found.setdefault(partner.name, partner)
        for ext in self.catalog.extensions():
            found.setdefault(ext.host, Partner(ext.host, ext.url, ext.thumbprint))
        return sorted(found.values(), key=lambda p: p.name)

    def rewrite(self, host: str, old: str, new: str) -> list[tuple[str, str]]:
        """Pin ``new`` wherever ``host`` is pinned as ``old``; the (kind, VM) records changed."""
        changed: list[tuple[str, str]] = []
        for rel in self.catalog.relationships():
            partner = rel.replica if rel.role is Role.PRIMARY else rel.primary
            if partner == host and rel.thumbprint == old:
                self.catalog.put_relationship(rel.model_copy(update={"thumbprint": new}))
                changed.append((rel.role.value, rel.vm_uuid))
        for ext in self.catalog.extensions():
            if ext.host == host and ext.thumbprint == old:
                self.catalog.put_extension(ext.model_copy(update={"thumbprint": new}))
                changed.append(("extension", ext.vm_uuid))
        return changed

    def follow(self, host: str, old: str, new: str) -> int:
        """Rewrite now, and again (in the background) once each record's holder let go."""
        changed = self.rewrite(host, old, new)
        if changed:
            task = asyncio.get_running_loop().create_task(self._settle(host, old, new, changed))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
        return len(changed)

    async def _settle(self, host: str, old: str, new: str,
                      changed: list[tuple[str, str]]) -> None:  # fmt: skip
        for kind, vm_uuid in changed:
            try:
                async with self._locks[kind](vm_uuid):
                    self.rewrite(host, old, new)
            except Exception:  # a background task: log, never lose the others
                log.exception("re-pinning host %s for VM %s failed", host, vm_uuid)
        log.info("pins of host %s follow its renewed certificate %s", host, new[:16])

    async def shutdown(self) -> None:
        for task in list(self._settling):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
