"""The steps every failover operation is made of, and the services it stands on.

Finding the replica VM and a recovery point, making qcow2 overlays over a
point, writing the failover state (only through
:func:`ferry.core.failover.advance`) and entering a job's next phase (in the
order of :data:`ferry.core.failover.PHASES`, written at once; a cancel asked
for is honoured here, and the ``crash_failover_at`` test hook acts here).

The services are narrow protocols (:class:`Vms`, :class:`Primary`), so the
failover phases run in unit tests against :mod:`ferry.testing.vms`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ferry.adapters import qemu_img
from ferry.adapters.catalog import Catalog, VmRecord
from ferry.core import failover as machine
from ferry.core.cpu_models import CpuFacts
from ferry.core.failover import FailoverJob, FailoverOp, Phase
from ferry.core.relationship import InitialMethod, Relationship
from ferry.core.replication import PointInfo
from ferry.core.spec import DiskSpec
from ferry.core.vmstate import VmOp, VmState
from ferry.errors import NotFoundError, StateError
from ferry.host.config import HostConfig
from ferry.host.jobs import Job, JobRegistry
from ferry.host.replication.receiver import ReplicaStore, disk_file
from ferry.peer.client import Connector

log = logging.getLogger(__name__)

TEST_PREFIX = "test"  # test failover overlays: test-disk{i}.qcow2 in the chain's dir
RUN_PREFIX = "run"  # failover overlays: run-disk{i}.qcow2


class Vms(Protocol):
    """What failover needs of the VM service."""

    @property
    def config(self) -> HostConfig: ...
    @property
    def catalog(self) -> Catalog: ...
    @property
    def cpu(self) -> CpuFacts: ...
    def get(self, name: str) -> VmRecord: ...
    def apply(self, vm: VmRecord | str, op: VmOp) -> VmState: ...
    async def start(self, name: str, *, paused: bool = False) -> VmRecord: ...
    async def stop(self, name: str, *, timeout: float | None = None) -> tuple[VmRecord, bool]: ...
    async def kill(self, name: str) -> VmRecord: ...
    async def delete(self, name: str, *, force: bool = False) -> None: ...
    async def end_qemu(self, record: VmRecord) -> None: ...


class Primary(Protocol):
    """What failover needs of this host's primary side of replication."""

    def primary_of(self, name: str) -> tuple[VmRecord, Relationship]: ...
    async def sync_now(self, name: str) -> dict[str, Any]: ...
    def forget(self, vm_uuid: str) -> None: ...
    async def enable(self, name: str, *, replica: str, replica_url: str, frequency_s: int,
                     recovery_points: int, initial: InitialMethod, media_dir: str | None,
                     compression: bool, initial_after: float | None = None,
                     network_map: Mapping[str, str] | None = None,
                     ) -> dict[str, Any]: ...  # fmt: skip


# (overlay, backing file, virtual size) -> the overlay exists
MakeOverlay = Callable[[Path, Path, int], Awaitable[None]]


@dataclass
class FailoverSteps:
    vms: Vms
    jobs: JobRegistry
    store: ReplicaStore
    replication: Primary
    peers: Connector
    make_overlay: MakeOverlay | None = None

    def __post_init__(self) -> None:
        self.config: HostConfig = self.vms.config
        self.catalog: Catalog = self.vms.catalog
        if self.make_overlay is None:
            self.make_overlay = self._qemu_img_overlay

    async def _qemu_img_overlay(self, overlay: Path, backing: Path, size: int) -> None:
        await qemu_img.create_overlay(overlay, backing, size, qemu_img=self.config.qemu_img)

    # -- the replica and its points ----------------------------------------------------

    def replica(self, name: str) -> tuple[VmRecord, Relationship]:
        return self.store.replica_of(name, commands="failover commands")

    def point(self, rel: Relationship, point_id: int | None) -> PointInfo:
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

    async def overlays(self, rel: Relationship, record: VmRecord, point: PointInfo,
                       prefix: str) -> tuple[DiskSpec, ...]:  # fmt: skip
        """Fresh qcow2 overlays ``{prefix}-disk{i}.qcow2`` over ``point``'s files."""
        assert self.make_overlay is not None
        storage = Path(rel.storage)
        disks = []
        for i, disk in enumerate(record.spec.disks):
            overlay = storage / f"{prefix}-disk{i}.qcow2"
            overlay.unlink(missing_ok=True)
            await self.make_overlay(overlay, disk_file(storage, point.file, i), disk.size)
            disks.append(DiskSpec(path=str(overlay), size=disk.size, format="qcow2"))
        return tuple(disks)

    async def switch_to_overlays(self, rel: Relationship, record: VmRecord,
                                 point: PointInfo) -> None:  # fmt: skip
        """The replica VM's disks become fresh overlays over ``point``; it is then off."""
        disks = await self.overlays(rel, record, point, RUN_PREFIX)
        self.catalog.update_spec(record.spec.model_copy(update={"disks": disks}))
        self.vms.apply(record.uuid, VmOp.RELEASE)

    # -- writing the failover state ------------------------------------------------------

    def check(self, rel: Relationship, op: FailoverOp) -> None:
        machine.check(rel, op, host=self.config.name)

    def advance(self, vm_uuid: str, op: FailoverOp, *, point: int | None = None,
                test_vm: str | None = None) -> Relationship:  # fmt: skip
        """Apply ``op`` to the relationship as the catalog holds it now, and write it."""
        rel = self.store.relationship(vm_uuid)
        new = machine.advance(rel, op, host=self.config.name, point=point, test_vm=test_vm)
        self.catalog.put_relationship(new)
        log.getChild(rel.vm_name).info("failover %s -> %s by %s", rel.failover.value,
                                       new.failover.value, op.value)  # fmt: skip
        return new

    # -- jobs ----------------------------------------------------------------------------

    def phase(self, job: Job | None, phase: Phase) -> None:
        """Enter a phase: a cancel asked for stops the job here; else written at once.

        The crash test hook (``crash_failover_at``) exits the agent right after.
        """
        if job is None:
            return
        kind = FailoverJob(job.kind)
        machine.next_phase(kind, job.detail.get("phase"), phase)
        self.jobs.checkpoint(job)
        self.jobs.update(job, phase=phase.value)
        if self.config.crash_failover_at == phase.value:
            log.warning("test hook crash_failover_at=%s: exiting now", phase.value)
            logging.shutdown()
            os._exit(70)
