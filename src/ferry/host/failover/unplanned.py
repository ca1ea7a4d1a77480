"""Unplanned failover on the replica host: start the replica VM, then complete or cancel.

``start`` boots the replica VM itself on overlays over a recovery point
(``run-disk{i}.qcow2``), refusing while the primary is reachable and runs
the VM (:mod:`.split_brain`) unless forced. The decision comes first: the
relationship records ``failed-over`` and the point before the overlays
exist, so a restart finishes them (:mod:`.recovery`). ``cancel`` goes back to
being a replica (the overlays are only new files on top of the chain);
``complete`` makes the failover final (the other points go).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ferry.adapters.firmware import check_firmware_here
from ferry.core.cpu_models import check_cpu
from ferry.core.failover import FailoverOp, FailoverState, Phase
from ferry.core.relationship import Relationship
from ferry.core.vmstate import VmOp, VmState
from ferry.host.failover.split_brain import SplitBrainGuard
from ferry.host.failover.steps import RUN_PREFIX, FailoverSteps
from ferry.host.jobs import Job
from ferry.host.replication.receiver import disk_file

log = logging.getLogger(__name__)


class Failover:
    def __init__(self, steps: FailoverSteps, guard: SplitBrainGuard) -> None:
        self.steps = steps
        self.guard = guard
        # Run before anything changes (the replica broker: this node must hold the replica).
        self.checks: list[Callable[[Relationship], Awaitable[None]]] = []
        # Run once a failed-over VM runs here (the replica broker makes it a VM of its
        # cluster, host/replication/broker.py); what one returns joins the result.
        self.started: list[Callable[[Relationship], Awaitable[dict[str, Any]]]] = []
        # A cancel runs these before it stops the VM (the broker takes it out of its
        # cluster, so that cluster's HA does not start it again) and these once it is
        # a replica again (the broker's store holds the replica here again).
        self.cancelling: list[Callable[[Relationship], Awaitable[None]]] = []
        self.cancelled: list[Callable[[Relationship], Awaitable[None]]] = []

    async def start(self, name: str, point_id: int | None, *, force: bool = False,
                    job: Job | None = None) -> dict[str, Any]:  # fmt: skip
        s = self.steps
        record, rel = s.replica(name)
        s.check(rel, FailoverOp.START)
        check_cpu(record.spec.cpu_model, s.vms.cpu, vm=name)
        check_firmware_here(record.spec.firmware, s.vms.config.firmware_descriptors,
                            host=s.vms.config.name, vm=name)  # fmt: skip
        # Its NICs (same MACs) join the networks the relationship's map named
        # when the replica was made or set; they and their bridges must be here.
        await s.store.networks().check_runnable(record.spec)
        s.phase(job, Phase.CHECKING_PRIMARY)
        if not force:  # a planned failover's primary is asked too: its VM must be off
            await self.guard.check(rel)
        for check in self.checks:
            await check(rel)
        async with s.store.lock(rel.vm_uuid):
            point = s.point(rel, point_id)
            # The decision first: a restart finds a failed-over relationship and
            # finishes the overlays (recovery); cancel undoes either way.
            rel = s.advance(rel.vm_uuid, FailoverOp.START, point=point.id)
            s.phase(job, Phase.CREATING_OVERLAYS)
            await s.switch_to_overlays(rel, record, point)
        s.phase(job, Phase.STARTING_VM)
        started = time.monotonic()
        await s.vms.start(name)
        log.info("VM %s: failed over to %s on recovery point %d", name, s.config.name,
                 point.id)  # fmt: skip
        result = {"vm": name, "host": s.config.name, "point": point.id, "time": point.time,
                  "start_s": round(time.monotonic() - started, 3)}  # fmt: skip
        for hook in self.started:
            result.update(await hook(rel))
        return result

    async def complete(self, name: str, job: Job | None = None) -> dict[str, Any]:
        """Make a failover final: the other recovery points go, the VM stays."""
        s = self.steps
        record, rel = s.replica(name)
        s.check(rel, FailoverOp.COMPLETE)
        s.phase(job, Phase.DROPPING_POINTS)
        async with s.store.lock(rel.vm_uuid):
            storage = Path(rel.storage)
            for point in s.catalog.points(rel.vm_uuid):
                if point.id > (rel.failover_point or 0):
                    for i in range(len(record.spec.disks)):
                        disk_file(storage, point.file, i).unlink(missing_ok=True)
                if point.id != rel.failover_point:
                    s.catalog.delete_point(rel.vm_uuid, point.id)
            rel = s.advance(rel.vm_uuid, FailoverOp.COMPLETE)
        log.info("VM %s: failover to recovery point %s completed", name, rel.failover_point)
        return {"vm": name, "host": s.config.name, "point": rel.failover_point,
                "completed": True}  # fmt: skip

    async def cancel(self, name: str, job: Job | None = None) -> dict[str, Any]:
        """Back to a replica as before the failover; what the VM wrote since is gone."""
        s = self.steps
        record, rel = s.replica(name)
        s.check(rel, FailoverOp.CANCEL)
        s.phase(job, Phase.STOPPING_VM)
        for hook in self.cancelling:
            await hook(rel)
        if record.state not in (VmState.OFF, VmState.CRASHED, VmState.REPLICA):
            await s.vms.kill(name)
        s.phase(job, Phase.RESTORING_REPLICA)
        async with s.store.lock(rel.vm_uuid):
            record = s.catalog.get(rel.vm_uuid)
            stem = s.catalog.points(rel.vm_uuid)[-1].file
            # Only the run overlays go (by name: after a crash the spec may still
            # name the chain's own files).
            for overlay in Path(rel.storage).glob(f"{RUN_PREFIX}-disk*.qcow2"):
                overlay.unlink(missing_ok=True)
            s.catalog.update_spec(s.store.replica_spec(record.spec, Path(rel.storage), stem))
            s.vms.apply(record.uuid, VmOp.MAKE_REPLICA)
            rel = s.advance(rel.vm_uuid, FailoverOp.CANCEL)
        for after in self.cancelled:
            await after(rel)
        log.info("VM %s: failover cancelled; a replica again", name)
        return {"vm": name, "host": s.config.name, "cancelled": True}

    async def undo(self, name: str) -> None:
        """A cancelled ``start`` job: back to a replica if it had decided to fail over."""
        _, rel = self.steps.replica(name)
        if rel.failover is FailoverState.FAILED_OVER:
            await self.cancel(name)
