"""The failover service: every failover operation of this host, run as a job.

On the replica host: test failover (:mod:`.drill`), unplanned failover with
complete and cancel (:mod:`.unplanned`, guarded by :mod:`.split_brain`) and
``replication reverse`` (:mod:`.reverse`); from the primary: planned
failover (:mod:`.planned`); after a restart, :mod:`.recovery`. The failover
state is written only through :mod:`ferry.core.failover`.

This module wires them together: each operation runs as a job of kind
``failover-<action>`` through the job runner, ``ferry job cancel`` reaches
the job's undo through the cancel handlers registered here, and the peer
endpoints of :mod:`ferry.peer.failover` are answered by the handlers
registered with :meth:`FailoverService.register`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ferry.core import failover as machine
from ferry.core.failover import CANCELLABLE, NOT_CANCELLABLE, TOO_LATE, FailoverJob
from ferry.core.jobs import JobState
from ferry.errors import StateError
from ferry.host.failover.drill import FailoverDrill
from ferry.host.failover.planned import PlannedFailover
from ferry.host.failover.recovery import FailoverRecovery
from ferry.host.failover.reverse import Reversal
from ferry.host.failover.split_brain import SplitBrainGuard
from ferry.host.failover.steps import FailoverSteps, MakeOverlay, Primary, Vms
from ferry.host.failover.unplanned import Failover
from ferry.host.jobs import Job, JobRegistry
from ferry.host.replication.receiver import ReplicaStore
from ferry.peer import failover as wire
from ferry.peer.client import Connector
from ferry.peer.server import PeerServer

log = logging.getLogger(__name__)

Operation = Callable[[Job], Awaitable[dict[str, Any]]]


class FailoverService:
    def __init__(self, vms: Vms, jobs: JobRegistry, store: ReplicaStore, replication: Primary,
                 peers: Connector, *, make_overlay: MakeOverlay | None = None) -> None:  # fmt: skip
        self.steps = FailoverSteps(vms, jobs, store, replication, peers, make_overlay)
        self.jobs = jobs
        self.config = self.steps.config
        self.guard = SplitBrainGuard(self.steps)
        self.drill = FailoverDrill(self.steps)
        self.unplanned = Failover(self.steps, self.guard)
        self.reversal = Reversal(self.steps, self.unplanned)
        self.planned = PlannedFailover(self.steps, self.unplanned, self.reversal)
        self.recovery = FailoverRecovery(self.steps, self.drill, self.planned)
        for kind in FailoverJob:
            if kind in CANCELLABLE:
                jobs.on_cancel(kind.value, self._cancel)
            else:
                jobs.refuse_cancel(kind.value, NOT_CANCELLABLE[kind])

    def register(self, server: PeerServer) -> None:
        """Answer this capability's peer endpoints."""
        server.handle(wire.VM_STATE, self.guard.answer)
        server.handle(wire.YIELD, self.reversal.yield_primary)
        server.handle(wire.PLANNED, self.planned.planned_here)

    # -- operations as jobs ------------------------------------------------------------

    def run_job(self, action: str, name: str, operation: Operation, **detail: Any) -> Job:
        """Run failover ``action`` on VM ``name`` as a job; its result or error ends it."""
        kind = FailoverJob(f"failover-{action}")
        record = self.steps.vms.get(name)
        job = self.jobs.create(kind.value, record.uuid, name, "running",
                               **{"phase": machine.first_phase(kind).value, **detail})  # fmt: skip
        self.jobs.run(job, operation(job), undo=lambda: self._undo(kind, job, name))
        return job

    def start_planned(self, name: str) -> Job:
        record, rel = self.planned.check(name)
        return self.run_job("planned", name, lambda job: self.planned.run(job, record, rel),
                            target=rel.replica)  # fmt: skip

    async def _undo(self, kind: FailoverJob, job: Job, name: str) -> None:
        if kind is FailoverJob.TEST:
            await self.drill.undo(name)
        elif kind is FailoverJob.START:
            await self.unplanned.undo(name)
        elif kind is FailoverJob.PLANNED:
            await self.planned.undo(job, name)

    def _cancel(self, job: Job) -> None:
        """``ferry job cancel`` of a cancellable failover job: stop at its next phase."""
        kind = FailoverJob(job.kind)
        phase = job.detail.get("phase")
        if job.state == JobState.RUNNING and machine.too_late_to_cancel(kind, phase):
            raise StateError(f"job {job.id} is {phase}: too late to cancel; "
                             + TOO_LATE[kind].format(vm=job.vm_name))  # fmt: skip
        self.jobs.request_cancel(job)

    # -- the operations (the API runs them as jobs; replica moves call stop_test) ------

    async def test(self, name: str, point_id: int | None, job: Job | None = None, *,
                   test_network: str | None = None) -> dict[str, Any]:  # fmt: skip
        return await self.drill.test(name, point_id, job, test_network=test_network)

    async def check_test_network(self, test_network: str | None) -> None:
        """Before a test job: ``--test-network`` names a network of this host with its bridge."""
        await self.drill.check_test_network(test_network)

    async def stop_test(self, name: str, job: Job | None = None) -> dict[str, Any]:
        return await self.drill.stop_test(name, job)

    async def start(self, name: str, point_id: int | None, *, force: bool = False,
                    job: Job | None = None) -> dict[str, Any]:  # fmt: skip
        return await self.unplanned.start(name, point_id, force=force, job=job)

    async def complete(self, name: str, job: Job | None = None) -> dict[str, Any]:
        return await self.unplanned.complete(name, job)

    async def cancel(self, name: str, job: Job | None = None) -> dict[str, Any]:
        return await self.unplanned.cancel(name, job)

    async def reverse(self, name: str, job: Job | None = None) -> dict[str, Any]:
        return await self.reversal.reverse(name, job)

    async def recover(self) -> None:
        """On agent start: see :mod:`ferry.host.failover.recovery`."""
        await self.recovery.recover()
