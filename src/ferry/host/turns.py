"""Turns on one VM's disks: jobs that use them wait for each other.

A move, a replication cycle, a live export and a ``refresh-vms`` of one VM
each run block jobs on the VM's disk nodes (QEMU allows one backup job per
node, and a mirror or migration must not race a backup), so they take turns:
one holds the VM's turn, the others wait in order of arrival. A waiting job
is told whom it waits for (``waiting`` callback), so its progress can say so
instead of looking stuck. Other VMs are never delayed. Turns are not
re-entrant: code that holds a turn calls helpers that assume it, never
``turn`` again for the same VM.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable


class DiskTurns:
    """One queue per VM (by UUID) for the jobs that use its disks."""

    def __init__(self) -> None:
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._holders: dict[str, str] = {}

    def holder(self, vm_uuid: str) -> str | None:
        """What holds the VM's turn now (e.g. "a replication cycle"), if anything."""
        return self._holders.get(vm_uuid)

    @contextlib.asynccontextmanager
    async def turn(
        self, vm_uuid: str, what: str, *, waiting: Callable[[str | None], None] | None = None
    ) -> AsyncIterator[None]:
        """Hold the VM's turn as ``what`` for the block; wait for it first if taken.

        ``waiting`` hears why the caller waits, and None once its turn came.
        """
        lock = self._locks[vm_uuid]
        waited = lock.locked() and waiting is not None
        if waited and waiting is not None:
            waiting(f"waiting for {self._holders.get(vm_uuid, 'another job')} to finish")
        async with lock:
            if waited and waiting is not None:
                waiting(None)
            self._holders[vm_uuid] = what
            try:
                yield
            finally:
                self._holders.pop(vm_uuid, None)

    def forget(self, vm_uuid: str) -> None:
        """The VM left this host: drop its queue unless someone still uses it."""
        lock = self._locks.get(vm_uuid)
        if lock is not None and not lock.locked():
            del self._locks[vm_uuid]
