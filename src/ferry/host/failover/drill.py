"""Test failover, on the replica host: a drill that boots a recovery point beside replication.

``test`` boots ``<VM>-test`` (a new UUID) on fresh qcow2 overlays over a
recovery point; replication goes on, and retention leaves that point alone
until ``stop-test`` deletes the VM and its overlays. The test VM has no NIC,
so a drill never meets production on the wire, unless ``--test-network NET``
names a network of this host (Hyper-V's test network): then each of the VM's
NICs is there, with a new MAC (the replica keeps the real ones for a
failover). The failover state (``testing``) and the point are written
before anything exists, so ``stop-test`` knows what to remove whatever step a
crash or a cancel cut short.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from pathlib import Path
from typing import Any

from ferry.adapters.firmware import check_firmware_here
from ferry.core.cpu_models import check_cpu
from ferry.core.failover import FailoverOp, FailoverState, Phase
from ferry.core.spec import NicSpec, VmSpec
from ferry.core.vmstate import VmState
from ferry.errors import ConflictError
from ferry.host.failover.steps import TEST_PREFIX, FailoverSteps
from ferry.host.jobs import Job

log = logging.getLogger(__name__)


class FailoverDrill:
    def __init__(self, steps: FailoverSteps) -> None:
        self.steps = steps

    async def check_test_network(self, test_network: str | None) -> None:
        """Refuse a test network this host lacks, or whose bridge is gone (before a job)."""
        if test_network is not None:
            networks = self.steps.store.networks()
            await networks.require_bridge(networks.get(test_network))

    def _test_nics(self, spec: VmSpec, test_network: str | None) -> tuple[NicSpec, ...]:
        if test_network is None:
            return ()
        on_test = [nic.model_copy(update={"network": test_network}) for nic in spec.nics]
        return self.steps.store.networks().renew_macs(on_test)

    async def test(self, name: str, point_id: int | None, job: Job | None = None, *,
                   test_network: str | None = None) -> dict[str, Any]:  # fmt: skip
        s = self.steps
        record, rel = s.replica(name)
        s.check(rel, FailoverOp.TEST)
        await self.check_test_network(test_network)
        check_cpu(record.spec.cpu_model, s.vms.cpu, vm=name)
        check_firmware_here(record.spec.firmware, s.vms.config.firmware_descriptors,
                            host=s.vms.config.name, vm=name)  # fmt: skip
        test_name = f"{name}-test"
        if s.catalog.find(test_name) is not None:
            raise ConflictError(f"host {s.config.name!r} already has a VM named {test_name!r}")
        async with s.store.lock(rel.vm_uuid):
            point = s.point(rel, point_id)
            # Written first: the point is pinned against retention and
            # stop-test knows what to remove whatever step a crash cut short.
            test_uuid = str(uuidlib.uuid4())
            rel = s.advance(rel.vm_uuid, FailoverOp.TEST, point=point.id, test_vm=test_uuid)
            s.phase(job, Phase.CREATING_OVERLAYS)
            disks = await s.overlays(rel, record, point, TEST_PREFIX)
            spec = record.spec.model_copy(update={
                "uuid": test_uuid, "name": test_name, "disks": disks,
                "nics": self._test_nics(record.spec, test_network)})  # fmt: skip
            s.catalog.add_vm(spec, VmState.OFF)
        s.phase(job, Phase.STARTING_VM)
        await s.vms.start(test_name)
        log.info("VM %s: test failover %s runs on recovery point %d", name, test_name, point.id)
        return {"vm": name, "test_vm": test_name, "host": s.config.name, "point": point.id,
                "time": point.time, "test_network": test_network}  # fmt: skip

    async def stop_test(self, name: str, job: Job | None = None) -> dict[str, Any]:
        s = self.steps
        _, rel = s.replica(name)
        s.check(rel, FailoverOp.STOP_TEST)
        s.phase(job, Phase.DELETING_VM)
        test = s.catalog.find(rel.test_vm) if rel.test_vm else None
        if test is not None:
            await s.vms.delete(test.name, force=True)  # its overlays are its disks
        async with s.store.lock(rel.vm_uuid):
            for overlay in Path(rel.storage).glob(f"{TEST_PREFIX}-disk*.qcow2"):
                overlay.unlink(missing_ok=True)  # left by a test cut short by a crash
            s.advance(rel.vm_uuid, FailoverOp.STOP_TEST)
        s.phase(job, Phase.MERGING)
        await s.store.retain(rel.vm_uuid)  # merges that waited for the test
        log.info("VM %s: test failover ended", name)
        return {"vm": name, "test_vm": f"{name}-test", "stopped": True}

    async def undo(self, name: str) -> None:
        """A cancelled ``test`` job: whatever it made goes, as ``stop-test`` removes it."""
        _, rel = self.steps.replica(name)
        if rel.failover is FailoverState.TESTING:
            await self.stop_test(name)
