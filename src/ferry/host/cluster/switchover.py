"""Ownership follows a clustered VM's live move, by compare-and-swap at the switch-over.

The move's source calls :meth:`OwnerHandover.before_switch` once its QEMU
completed the stream and is paused (its images inactive), before it asks the
destination to resume: ``owner`` goes from this node to the destination as
a *pending* move (``from`` = this node), compared on its revision. If that
fails the move is undone before the destination ever ran the VM. Then
:meth:`OwnerHandover.after_switch`:

- the destination resumed: ``owner`` settles on it (a failure here is mended
  by either side's reconciler: the destination confirms a pending move it
  runs, the source releases one it no longer has);
- the destination could not resume: ``owner`` comes back to this node, and
  only if that compare-and-swap wins may the source resume its QEMU. Until
  then nobody starts the VM: a pending owner is never started by either side
  (:mod:`ferry.core.cluster.reconcile`), unless the source's lease expired
  (its QEMUs are fenced), when the destination takes it: it resumes its
  incoming QEMU if it holds the stream (the reconciler's rescue), else starts
  the VM from its disks.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ferry.core.cluster.roles import Owner
from ferry.core.cluster.store import Compare, Put
from ferry.errors import FerryError, MoveFailedError
from ferry.host.cluster.vms import ClusterVms
from ferry.host.jobs import JobRegistry

log = logging.getLogger(__name__)

RECLAIM_WAIT_S = 20.0  # how long the source tries to take the owner back


class OwnerHandover:
    """The switch-over guard of :class:`ferry.host.migration.source.MoveSource`."""

    def __init__(self, cluster_vms: ClusterVms, jobs: JobRegistry | None = None) -> None:
        """``jobs``: where the move's job is, to record its hand-over for a restart."""
        self.cluster_vms = cluster_vms
        self.jobs = jobs
        self._pending: dict[str, int] = {}  # move job id -> owner's revision while pending
        self.hold_after_handover_s = 0.0  # host.toml's test hook of that name

    async def before_switch(self, vm_uuid: str, target: str, job: str) -> None:
        """Owner: this node -> ``target`` (pending). Raises to undo the move."""
        cvms = self.cluster_vms
        if vm_uuid not in cvms.clustered:
            return
        try:
            m = cvms.membership()
            owner, entry = await cvms.owner_entry(m, vm_uuid)
            if owner is None or entry is None or owner.node != cvms.node or owner.pending:
                held = "nobody" if owner is None else owner.node
                raise MoveFailedError(f"the cluster says node {held} owns the VM, not "
                                      f"{cvms.node}")  # fmt: skip
            moving = Owner.moving(target, source=cvms.node, move=job)
            result = await m.store.txn([Compare.unchanged(entry.key, entry.mod_revision)],
                                       [Put(entry.key, moving.encode())])  # fmt: skip
        except MoveFailedError:
            raise
        except FerryError as exc:
            raise MoveFailedError(f"cannot hand the VM's ownership to {target}: {exc}") from exc
        if not result.succeeded:
            raise MoveFailedError(f"the VM's owner changed in the cluster during the move; it "
                                  f"stays on {cvms.node}")  # fmt: skip
        self._pending[job] = result.revision
        log.info("move %s: owner of %s pending %s -> %s", job, vm_uuid, cvms.node, target)
        record = self.jobs.find(job) if self.jobs is not None else None
        if self.jobs is not None and record is not None:  # a restart finishes it there
            self.jobs.update(record, durable=True, handover_revision=result.revision)
        if self.hold_after_handover_s > 0:
            log.warning("test hook hold_after_handover_s: waiting %.1f s",
                        self.hold_after_handover_s)  # fmt: skip
            await asyncio.sleep(self.hold_after_handover_s)

    async def after_switch(self, vm_uuid: str, target: str, job: str, *, resumed: bool) -> bool:
        """Settle the owner; False: the source must not resume (it stays paused)."""
        revision = self._pending.pop(job, None)
        if revision is None:
            return True  # not clustered
        cvms = self.cluster_vms
        settled = Owner.settled(target if resumed else cvms.node)
        deadline = time.monotonic() + (0 if resumed else RECLAIM_WAIT_S)
        while True:
            try:
                m = cvms.membership()
                key = m.keys.vm_owner(vm_uuid)
                result = await m.store.txn([Compare.unchanged(key, revision)],
                                           [Put(key, settled.encode())])  # fmt: skip
            except FerryError as exc:
                log.warning("move %s: cannot settle the owner of %s on %s yet: %s", job,
                            vm_uuid, settled.node, exc)  # fmt: skip
            else:
                if resumed:
                    cvms.mark(vm_uuid, None)
                outcome = "won" if result.succeeded else "already changed"
                log.info("move %s: owner of %s settled on %s (%s)", job, vm_uuid,
                         settled.node, outcome)  # fmt: skip
                return result.succeeded or resumed
            if time.monotonic() >= deadline:
                if resumed:
                    cvms.mark(vm_uuid, None)  # the reconcilers settle it later
                return resumed
            await asyncio.sleep(1.0)
