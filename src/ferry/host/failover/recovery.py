"""After an agent restart: every failover cut short is left completable or cancellable.

A failover job still running (or asked to cancel) was interrupted: it is
marked failed with what to do. A failed-over replica whose disks were not
switched yet gets its overlays (the VM is then off: start it, complete or
cancel). A test failover whose VM was never created is cleared, and a
planned failover that died while its QEMU waited stopped (-S) has that QEMU
ended: the VM is off here.
"""

from __future__ import annotations

import logging

from ferry.core.failover import FailoverJob, FailoverState, Phase
from ferry.core.jobs import JobState
from ferry.core.relationship import Role
from ferry.core.vmstate import VmState
from ferry.errors import FerryError
from ferry.host.failover.drill import FailoverDrill
from ferry.host.failover.planned import PlannedFailover
from ferry.host.failover.steps import FailoverSteps

log = logging.getLogger(__name__)

_KINDS = frozenset(kind.value for kind in FailoverJob)
_LIVE = frozenset({JobState.RUNNING.value, JobState.CANCELLING.value})
# A planned failover interrupted in these phases may have left its -S QEMU.
_STOPPED_QEMU = frozenset({Phase.FINAL_CYCLE.value, Phase.STARTING_ON_REPLICA.value})
# Killed before its first 'cont', a -S QEMU is re-attached in prelaunch: 'starting'.
_WITH_QEMU = frozenset({VmState.STARTING, VmState.PAUSED, VmState.RUNNING})


class FailoverRecovery:
    def __init__(self, steps: FailoverSteps, drill: FailoverDrill,
                 planned: PlannedFailover) -> None:  # fmt: skip
        self.steps = steps
        self.drill = drill
        self.planned = planned

    async def recover(self) -> None:
        s = self.steps
        for job in s.jobs.all():
            if job.kind not in _KINDS or job.state not in _LIVE:
                continue
            phase = job.detail.get("phase")
            s.jobs.update(job, JobState.FAILED.value, error=(
                f"interrupted by an agent restart in phase {phase}; see 'ferry replication "
                f"status {job.vm_name}' and complete, cancel or run it again"))  # fmt: skip
            record = s.catalog.find(job.vm_uuid)
            if (job.kind == FailoverJob.PLANNED and record is not None
                    and record.state in _WITH_QEMU and phase in _STOPPED_QEMU):  # fmt: skip
                await self.planned.end_stopped_qemu(record)
                log.warning("VM %s: planned failover interrupted; its stopped QEMU ended, "
                            "the VM is off here", job.vm_name)  # fmt: skip
        for rel in s.catalog.relationships():
            if rel.role is not Role.REPLICA:
                continue
            record = s.catalog.find(rel.vm_uuid)
            if record is None:
                continue
            try:
                failed_over = rel.failover in (FailoverState.FAILED_OVER, FailoverState.COMPLETED)
                if failed_over and record.state is VmState.REPLICA:
                    async with s.store.lock(rel.vm_uuid):
                        point = s.point(rel, rel.failover_point)
                        await s.switch_to_overlays(rel, record, point)
                    log.warning("VM %s: failover interrupted by a restart finished; the VM is "
                                "off on recovery point %d", rel.vm_name, point.id)  # fmt: skip
                test_gone = rel.test_vm is None or s.catalog.find(rel.test_vm) is None
                if rel.failover is FailoverState.TESTING and test_gone:
                    await self.drill.stop_test(rel.vm_name)
            except FerryError as exc:
                log.error("VM %s: cannot recover an interrupted failover: %s", rel.vm_name, exc)
