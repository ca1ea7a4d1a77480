"""Failover: start a replica VM from a recovery point, for a drill or for real.

On the replica host:

* **test failover** boots ``<VM>-test`` (a new UUID, no network: ferry VMs
  have no NIC unless asked) on fresh qcow2 overlays over a recovery point;
  replication goes on, and retention leaves that point alone until
  ``stop-test`` deletes the VM and its overlays.
* **unplanned failover** (``start``) boots the replica VM itself on overlays
  over a point (``run-disk{i}.qcow2``), refusing while the primary is
  reachable and runs the VM (split brain) unless forced. ``cancel`` goes back
  to being a replica; ``complete`` makes it final (the other points go).

From the primary, **planned failover** shuts the VM down cleanly, restarts
its QEMU with the guest stopped to cut a last delta (zero data loss), hands
the VM to the replica and reverses replication so the old primary's disks
are the initial copy (block hashes compared, only differences travel).
``replication reverse`` does the same reversal after an unplanned failover.

Every step is written to the catalog before it acts; the overlays are only
new files on top of the chain, so cancelling throws them away.
"""

from __future__ import annotations

import logging
import os
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ferry.adapters import qemu_img
from ferry.adapters.catalog import VmRecord
from ferry.adapters.pki import CertInfo, client_ssl_context
from ferry.client.agent_client import AgentClient
from ferry.core import replication as rules
from ferry.core.relationship import InitialMethod, Relationship, Role
from ferry.core.replication import PointInfo, ReplicationOp, ReplicationState
from ferry.core.spec import DiskSpec
from ferry.core.vmstate import VmState
from ferry.errors import (
    AuthError,
    ConflictError,
    ConnectionFailedError,
    FerryError,
    NotFoundError,
    StateError,
)
from ferry.host.jobs import Job, JobRegistry
from ferry.host.replication.primary import ReplicationService
from ferry.host.replication.receiver import ReplicaStore, disk_file
from ferry.host.vms.service import VmService

log = logging.getLogger(__name__)

S = ReplicationState
JOB_PREFIX = "failover-"
PLANNED_JOB = "failover-planned"
TEST_PREFIX = "test"  # test failover overlays: test-disk{i}.qcow2 in the chain's dir
RUN_PREFIX = "run"  # failover overlays: run-disk{i}.qcow2


class FailoverService:
    def __init__(self, vms: VmService, jobs: JobRegistry, store: ReplicaStore,
                 replication: ReplicationService) -> None:  # fmt: skip
        self.vms = vms
        self.jobs = jobs
        self.store = store
        self.replication = replication
        self.config = vms.config
        self.catalog = vms.catalog
        self._tls = client_ssl_context(self.config.tls_dir)

    # -- on the replica host -------------------------------------------------------

    def _replica(self, name: str) -> tuple[VmRecord, Relationship]:
        return self.store.replica_of(name, commands="failover commands")

    def _point(self, rel: Relationship, point_id: int | None) -> PointInfo:
        points = self.store.points(rel.vm_uuid)
        if not points:
            raise StateError(f"the replica of VM {rel.vm_name!r} has no recovery point yet")
        if point_id is None:
            return points[-1]
        for point in points:
            if point.id == point_id:
                return point
        ids = ", ".join(str(p.id) for p in points)
        raise NotFoundError(f"VM {rel.vm_name!r} has no recovery point {point_id} (has: {ids})")

    async def _overlays(self, rel: Relationship, record: VmRecord, point: PointInfo,
                        prefix: str) -> tuple[DiskSpec, ...]:  # fmt: skip
        storage = Path(rel.storage)
        disks = []
        for i, disk in enumerate(record.spec.disks):
            overlay = storage / f"{prefix}-disk{i}.qcow2"
            overlay.unlink(missing_ok=True)
            await qemu_img.create_overlay(overlay, disk_file(storage, point.file, i), disk.size,
                                          qemu_img=self.config.qemu_img)  # fmt: skip
            disks.append(DiskSpec(path=str(overlay), size=disk.size, format="qcow2"))
        return tuple(disks)

    # -- jobs ----------------------------------------------------------------------------

    def run_job(self, action: str, name: str,
                operation: Callable[[Job], Awaitable[dict[str, Any]]],
                **detail: Any) -> Job:  # fmt: skip
        """Run a failover operation as a job; its result or error ends up in the job."""
        record = self.vms.get(name)
        job = self.jobs.create(f"{JOB_PREFIX}{action}", record.uuid, name, "running",
                               **{"phase": "starting", **detail})  # fmt: skip
        self.jobs.run(job, operation(job))
        return job

    def _phase(self, job: Job | None, phase: str) -> None:
        """Enter a phase (written to the catalog at once); the crash test hook acts here."""
        if job is None:
            return
        self.jobs.update(job, phase=phase)
        if self.config.crash_failover_at == phase:
            log.warning("test hook crash_failover_at=%s: exiting now", phase)
            logging.shutdown()
            os._exit(70)

    # -- test failover -------------------------------------------------------------------

    async def test(self, name: str, point_id: int | None,
                   job: Job | None = None) -> dict[str, Any]:  # fmt: skip
        record, rel = self._replica(name)
        if rel.test_vm is not None:
            raise ConflictError(f"a test failover of VM {name!r} runs already; "
                                f"'ferry failover stop-test {name}' ends it")  # fmt: skip
        test_name = f"{name}-test"
        if self.catalog.find(test_name) is not None:
            raise ConflictError(f"host {self.config.name!r} already has a VM named {test_name!r}")
        async with self.store.lock(rel.vm_uuid):
            point = self._point(rel, point_id)
            # Written first, together: the point is pinned against retention and
            # stop-test knows what to remove whatever step a crash cut short.
            test_uuid = str(uuidlib.uuid4())
            rel = self.store.relationship(rel.vm_uuid).model_copy(update={
                "test_point": point.id, "test_vm": test_uuid})  # fmt: skip
            self.catalog.put_relationship(rel)
            self._phase(job, "creating-overlays")
            disks = await self._overlays(rel, record, point, TEST_PREFIX)
            spec = record.spec.model_copy(update={
                "uuid": test_uuid, "name": test_name, "disks": disks})  # fmt: skip
            self.catalog.add_vm(spec, VmState.OFF)
        self._phase(job, "starting-vm")
        await self.vms.start(test_name)
        log.info("VM %s: test failover %s runs on recovery point %d", name, test_name, point.id)
        return {"vm": name, "test_vm": test_name, "host": self.config.name, "point": point.id,
                "time": point.time}  # fmt: skip

    async def stop_test(self, name: str, job: Job | None = None) -> dict[str, Any]:
        _, rel = self._replica(name)
        if rel.test_vm is None:
            raise StateError(f"no test failover of VM {name!r} runs on host {self.config.name!r}")
        self._phase(job, "deleting-vm")
        test = self.catalog.find(rel.test_vm)
        if test is not None:
            await self.vms.delete(test.name, force=True)  # its overlays are its disks
        async with self.store.lock(rel.vm_uuid):
            for overlay in Path(rel.storage).glob(f"{TEST_PREFIX}-disk*.qcow2"):
                overlay.unlink(missing_ok=True)  # left by a test cut short by a crash
            rel = self.store.relationship(rel.vm_uuid)
            self.catalog.put_relationship(rel.model_copy(update={"test_vm": None,
                                                                "test_point": None}))  # fmt: skip
        self._phase(job, "merging")
        await self.store.retain(rel.vm_uuid)  # merges that waited for the test
        log.info("VM %s: test failover ended", name)
        return {"vm": name, "test_vm": f"{name}-test", "stopped": True}

    async def _running_elsewhere(self, rel: Relationship) -> str | None:
        """The host that answers and says the VM runs there, if any.

        Asked: the primary, and for an extended replica also the VM's origin
        (the replica in between runs it once it failed over).
        """
        hosts = [(rel.primary, rel.primary_url)]
        if rel.origin:
            hosts.append((rel.origin, rel.origin_url))
        for host, url in hosts:
            if not url:
                continue
            client = AgentClient(host, url, self._tls, server_name=host, timeout=5)
            try:
                async with client:
                    reply = await client.get(f"/v1/peer/vms/{rel.vm_uuid}")
            except (ConnectionFailedError, NotFoundError, AuthError):
                continue
            if str(reply.get("state")) in ("running", "paused", "starting", "migrating"):
                return host
        return None

    async def start(self, name: str, point_id: int | None, *, force: bool = False,
                    planned: bool = False, job: Job | None = None) -> dict[str, Any]:  # fmt: skip
        record, rel = self._replica(name)
        rules.transition(rel.state, ReplicationOp.FAILOVER, vm=name)
        if rel.test_vm is not None:
            raise ConflictError(f"a test failover of VM {name!r} runs; stop it first "
                                f"('ferry failover stop-test {name}')")  # fmt: skip
        self._phase(job, "checking-primary")
        running = None if force or planned else await self._running_elsewhere(rel)
        if running is not None:
            raise ConflictError(
                f"VM {name!r} still runs on host {running!r}: a failover now would run two "
                f"copies; use 'ferry failover planned {name}' from there, or stop it there, or "
                "pass --force if that host is really lost"
            )
        async with self.store.lock(rel.vm_uuid):
            point = self._point(rel, point_id)
            # The decision first: a restart finds a failed-over relationship and
            # finishes the overlays (:meth:`recover`); cancel undoes either way.
            rel = self.store.relationship(rel.vm_uuid).model_copy(update={
                "failover_point": point.id,
                "state": rules.transition(rel.state, ReplicationOp.FAILOVER)})  # fmt: skip
            self.catalog.put_relationship(rel)
            self._phase(job, "creating-overlays")
            await self._switch_to_overlays(rel, record, point)
        self._phase(job, "starting-vm")
        started = time.monotonic()
        await self.vms.start(name)
        log.info("VM %s: failed over to %s on recovery point %d", name, self.config.name,
                 point.id)  # fmt: skip
        return {"vm": name, "host": self.config.name, "point": point.id, "time": point.time,
                "start_s": round(time.monotonic() - started, 3)}  # fmt: skip

    async def _switch_to_overlays(self, rel: Relationship, record: VmRecord,
                                  point: PointInfo) -> None:  # fmt: skip
        """The replica VM's disks become fresh overlays over ``point``; it is then off."""
        disks = await self._overlays(rel, record, point, RUN_PREFIX)
        self.catalog.update_spec(record.spec.model_copy(update={"disks": disks}))
        self.catalog.set_state(record.uuid, VmState.OFF)

    async def complete(self, name: str, job: Job | None = None) -> dict[str, Any]:
        """Make a failover final: the other recovery points go, the VM stays."""
        record, rel = self._replica(name)
        if rel.state is not S.FAILED_OVER:
            raise StateError(f"VM {name!r} is not failed over (replication is {rel.state.value})")
        self._phase(job, "dropping-points")
        async with self.store.lock(rel.vm_uuid):
            storage = Path(rel.storage)
            for point in self.catalog.points(rel.vm_uuid):
                if point.id > (rel.failover_point or 0):
                    for i in range(len(record.spec.disks)):
                        disk_file(storage, point.file, i).unlink(missing_ok=True)
                if point.id != rel.failover_point:
                    self.catalog.delete_point(rel.vm_uuid, point.id)
            rel = self.store.relationship(rel.vm_uuid)
            self.catalog.put_relationship(rel.model_copy(update={"committed": True}))
        log.info("VM %s: failover to recovery point %s completed", name, rel.failover_point)
        return {"vm": name, "host": self.config.name, "point": rel.failover_point,
                "completed": True}  # fmt: skip

    async def cancel(self, name: str, job: Job | None = None) -> dict[str, Any]:
        """Back to a replica as before the failover; what the VM wrote since is gone."""
        record, rel = self._replica(name)
        rules.transition(rel.state, ReplicationOp.CANCEL_FAILOVER, vm=name)
        if rel.committed:
            raise StateError(f"the failover of VM {name!r} was completed; it cannot be "
                             "cancelled any more")  # fmt: skip
        self._phase(job, "stopping-vm")
        if record.state not in (VmState.OFF, VmState.CRASHED, VmState.REPLICA):
            await self.vms.kill(name)
        self._phase(job, "restoring-replica")
        async with self.store.lock(rel.vm_uuid):
            record = self.catalog.get(rel.vm_uuid)
            chain = self.catalog.points(rel.vm_uuid)
            stem = chain[-1].file
            # Only the run overlays go (by name: after a crash the spec may still
            # name the chain's own files).
            for overlay in Path(rel.storage).glob(f"{RUN_PREFIX}-disk*.qcow2"):
                overlay.unlink(missing_ok=True)
            self.catalog.update_spec(self.store.replica_spec(record.spec, Path(rel.storage), stem))
            self.catalog.set_state(record.uuid, VmState.REPLICA)
            rel = self.store.relationship(rel.vm_uuid)
            self.catalog.put_relationship(rel.model_copy(update={
                "failover_point": None,
                "state": rules.transition(rel.state, ReplicationOp.CANCEL_FAILOVER)}))  # fmt: skip
        log.info("VM %s: failover cancelled; a replica again", name)
        return {"vm": name, "host": self.config.name, "cancelled": True}

    # -- after a restart ---------------------------------------------------------------

    async def recover(self) -> None:
        """On agent start: every failover cut short is left completable or cancellable.

        A job still running was interrupted: it is marked failed with what to do.
        A failed-over replica whose disks were not switched yet gets its overlays
        (the VM is then off: start it, complete or cancel). A test failover whose
        VM was never created is cleared, and a planned failover that died
        while its QEMU waited stopped (-S) has that QEMU ended: the VM is off here.
        """
        for job in self.jobs.all():
            if job.kind.startswith(JOB_PREFIX) and job.state == "running":
                phase = job.detail.get("phase")
                self.jobs.update(job, "failed", error=(
                    f"interrupted by an agent restart in phase {phase}; see 'ferry replication "
                    f"status {job.vm_name}' and complete, cancel or run it again"))  # fmt: skip
                record = self.catalog.find(job.vm_uuid)
                if (job.kind == PLANNED_JOB and record is not None
                        and record.state in (VmState.PAUSED, VmState.RUNNING)
                        and phase in ("final-cycle", "starting-on-replica")):  # fmt: skip
                    await self.vms.end_qemu(record)
                    self.catalog.set_state(record.uuid, VmState.OFF)
                    log.warning("VM %s: planned failover interrupted; its stopped QEMU ended, "
                                "the VM is off here", job.vm_name)  # fmt: skip
        for rel in self.catalog.relationships():
            if rel.role is not Role.REPLICA:
                continue
            record = self.catalog.find(rel.vm_uuid)
            if record is None:
                continue
            try:
                if rel.state is S.FAILED_OVER and record.state is VmState.REPLICA:
                    async with self.store.lock(rel.vm_uuid):
                        point = self._point(rel, rel.failover_point)
                        await self._switch_to_overlays(rel, record, point)
                    log.warning("VM %s: failover interrupted by a restart finished; the VM is "
                                "off on recovery point %d", rel.vm_name, point.id)  # fmt: skip
                if rel.test_vm is not None and self.catalog.find(rel.test_vm) is None:
                    await self.stop_test(rel.vm_name)
            except FerryError as exc:
                log.error("VM %s: cannot recover an interrupted failover: %s", rel.vm_name, exc)

    # -- reversing: the failed-over VM replicates back to the old primary ----------------

    async def reverse(self, name: str, job: Job | None = None) -> dict[str, Any]:
        """After a failover: replicate back, the old primary's disks as initial copy."""
        _, rel = self._replica(name)
        if rel.state is not S.FAILED_OVER:
            raise StateError(f"VM {name!r} is not failed over here; nothing to reverse")
        if rel.origin:
            raise StateError(
                f"VM {name!r} failed over on an extended replica: ferry cannot reverse "
                f"replication from there to {rel.primary!r} yet; the VM runs on, protect it "
                "by hand for now"
            )
        if not rel.primary_url:
            raise ConnectionFailedError(f"no address known for the old primary {rel.primary!r}")
        self._phase(job, "asking-old-primary")
        old = AgentClient(rel.primary, rel.primary_url, self._tls, server_name=rel.primary,
                          timeout=60, pin=rel.thumbprint)  # fmt: skip
        async with old:
            hello = await old.get("/v1/peer/hello")
            rules.check_reverse_allowed(self.config.functional_level,
                                        int(hello["functional_level"]),
                                        running_host=self.config.name, old_primary=rel.primary,
                                        vm=name)  # fmt: skip
            # The old primary gives the relationship up (refused while its copy runs).
            await old.post(f"/v1/peer/replications/{rel.vm_uuid}/yield")
        if not rel.committed:
            await self.complete(name)
        self._phase(job, "enabling")
        # The chain stays on disk under the running overlays; only the records go.
        self.catalog.delete_relationship(rel.vm_uuid)
        status = await self.replication.enable(
            name, replica=rel.primary, replica_url=rel.primary_url,
            frequency_s=rel.frequency_s, recovery_points=rel.recovery_points,
            initial=InitialMethod.EXISTING, media_dir=None, compression=True)  # fmt: skip
        log.info("VM %s: replication reversed towards %s", name, rel.primary)
        return status

    def yield_primary(self, caller: CertInfo, vm_uuid: str) -> dict[str, Any]:
        """On the old primary: the replica failed over; stop being the primary."""
        rel = self.catalog.relationship(vm_uuid)
        if rel is None or rel.role is not Role.PRIMARY:
            raise NotFoundError(f"host {self.config.name!r} is not the primary of VM {vm_uuid}")
        if caller.thumbprint != rel.thumbprint:
            raise AuthError(f"only the replica host {rel.replica!r} of VM {rel.vm_name!r} may "
                            "take it over")  # fmt: skip
        record = self.catalog.find(vm_uuid)
        if record is not None and record.state not in (VmState.OFF, VmState.CRASHED):
            raise ConflictError(
                f"VM {rel.vm_name!r} is {record.state.value} on host {self.config.name!r} as "
                f"well: decide which copy wins, 'ferry vm kill {rel.vm_name} --host "
                f"{self.config.name}' the other, then reverse again"
            )
        self.replication.forget(vm_uuid)
        log.info("VM %s: failed over to %s; this host stops being its primary", rel.vm_name,
                 rel.replica)  # fmt: skip
        return {"vm": rel.vm_name, "yielded": True}

    # -- planned failover, run from the primary ------------------------------------------

    def start_planned(self, name: str) -> Job:
        record, rel = self.replication.primary_of(name)
        if rel.state is not S.REPLICATING:
            raise StateError(f"replication of VM {name!r} is {rel.state.value}; a planned "
                             "failover needs it replicating")  # fmt: skip
        return self.run_job("planned", name, lambda job: self._planned(job, record, rel),
                            phase="checking", target=rel.replica)  # fmt: skip

    async def _planned(self, job: Job, record: VmRecord, rel: Relationship) -> dict[str, Any]:
        name = record.name
        started = time.monotonic()
        # Replication must be able to flow back: this host admits the replica
        # host, and the replica does not run a newer level than this host.
        self.store.server.admit(rel.replica)
        async with self.replication.peer(rel) as peer:
            hello = await peer.get("/v1/peer/hello")
            rules.check_reverse_allowed(int(hello["functional_level"]),
                                        self.config.functional_level,
                                        running_host=rel.replica,
                                        old_primary=self.config.name, vm=name)  # fmt: skip
        self._phase(job, "shutting-down")
        if record.state in (VmState.RUNNING, VmState.PAUSED):
            _, forced = await self.vms.stop(name)
            if forced:
                log.warning("VM %s did not shut down in time; it was forced off", name)
        self._phase(job, "final-cycle")
        # The guest is off; QEMU comes back with it stopped so the last
        # delta can be cut from the bitmap saved at shutdown.
        await self.vms.start(name, paused=True)
        try:
            outcome = await self.replication.sync_now(name)
        finally:
            record = self.vms.get(name)
            await self.vms.end_qemu(record)
            self.catalog.set_state(record.uuid, VmState.OFF)
        if outcome["result"] != "ok":
            raise FerryError(f"the last replication cycle failed: {outcome.get('error')}; "
                             f"VM {name!r} stays here, off")  # fmt: skip
        self.jobs.update(job, last_point=outcome.get("point"))
        self._phase(job, "starting-on-replica")
        async with self.replication.peer(rel) as peer:
            started_there = await peer.post(f"/v1/peer/replicas/{rel.vm_uuid}/failover")
        return {"result": "ok", "host": rel.replica, "point": started_there.get("point"),
                "total_s": round(time.monotonic() - started, 3)}  # fmt: skip

    async def planned_here(self, caller: CertInfo, vm_uuid: str) -> dict[str, Any]:
        """On the replica: the primary shut the VM down and sent its last delta."""
        rel = self.store.relationship(vm_uuid)
        self.store.check_primary(caller, rel)
        record = self.catalog.get(vm_uuid)
        result = await self.start(record.name, None, planned=True)
        # Reverse at once: the old primary's disks are the initial copy. It is
        # told to yield by the reversal itself (its VM is off by now).
        await self.reverse(record.name)
        return result
