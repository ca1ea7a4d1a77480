"""The primary side of replication: enable, schedule, change, hand over, report health.

One asyncio task per relationship sleeps until its next cycle is due
(:func:`ferry.core.replication.next_due`), so a slow VM only delays itself;
what a cycle does is :mod:`ferry.host.replication.cycle`. Every cycle, change
and move of a VM runs under the relationship's cycle lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ferry.adapters.catalog import VmRecord
from ferry.adapters.pki import CertInfo, client_ssl_context
from ferry.client.agent_client import AgentClient
from ferry.core import replication as rules
from ferry.core.migration import Phase
from ferry.core.relationship import InitialMethod, Relationship, Role
from ferry.core.relationship import resume as resume_relationship
from ferry.core.replication import ReplicationOp, ReplicationState
from ferry.core.vmstate import VmState
from ferry.errors import (
    AuthError,
    ConflictError,
    ConnectionFailedError,
    FerryError,
    InvalidInputError,
    NotFoundError,
    StateError,
)
from ferry.host.jobs import JobRegistry
from ferry.host.migration.service import MOVE
from ferry.host.replication.cycle import INITIAL_JOB, CycleRunner, offer_replica
from ferry.host.replication.receiver import ReplicaStore
from ferry.host.replication.scheduler import CycleScheduler
from ferry.host.vms.service import VmService

log = logging.getLogger(__name__)

S = ReplicationState
PEER_TIMEOUT_S = 3600.0


class ReplicationService:
    """This host's relationships as a primary, and the status of its replica VMs."""

    def __init__(self, vms: VmService, jobs: JobRegistry, store: ReplicaStore) -> None:
        self.vms = vms
        self.jobs = jobs
        self.store = store
        self.config = vms.config
        self.catalog = vms.catalog
        self._tls = client_ssl_context(self.config.tls_dir)
        self.cycles = CycleRunner(vms, jobs, peer=self.peer, work_dir=self.work_dir)
        self.scheduler = CycleScheduler("replicate", delay=self._delay, cycle=self.cycles.run)
        self.cycle_locks = self.scheduler.locks

    @property
    def url(self) -> str:
        address, port = self.config.address
        return f"https://{address}:{port}"

    @property
    def work_dir(self) -> Path:
        return self.config.data_dir / "replication"

    def _rel(self, vm_uuid: str) -> Relationship | None:
        return self.cycles.primary_rel(vm_uuid)

    def primary_of(self, name: str) -> tuple[VmRecord, Relationship]:
        """The VM here and its relationship as primary, or a NotFoundError with the remedy."""
        record = self.vms.get(name)
        rel = self._rel(record.uuid)
        if rel is None:
            raise NotFoundError(
                f"VM {name!r} on host {self.config.name!r} is not replicated from here; "
                f"enable it with 'ferry replication enable {name} --replica HOST'"
            )
        return record, rel

    def forget(self, vm_uuid: str) -> None:
        """Drop this host's primary side of a relationship (the VM failed over)."""
        self.scheduler.cancel(vm_uuid)
        self.catalog.delete_relationship(vm_uuid)
        shutil.rmtree(self.work_dir / vm_uuid, ignore_errors=True)

    def peer(self, rel: Relationship, *, pin: bool = True) -> AgentClient:
        """A client for the relationship's replica host, pinned to its certificate."""
        return AgentClient(rel.replica, rel.replica_url, self._tls, server_name=rel.replica,
                           timeout=PEER_TIMEOUT_S, pin=rel.thumbprint if pin else None)  # fmt: skip

    # -- life ----------------------------------------------------------------------

    async def start(self) -> None:
        """On agent start: resume every relationship at its schedule.

        A relationship whose VM left this host by a move that finished while
        the agent was down is handed over to the VM's new host first.
        """
        for rel in self.catalog.relationships():
            if rel.role is not Role.PRIMARY:
                continue
            if self.catalog.find(rel.vm_uuid) is None:
                moves = [j for j in self.jobs.all() if j.vm_uuid == rel.vm_uuid
                         and j.kind == MOVE and j.state == Phase.DONE]  # fmt: skip
                if moves:
                    target = moves[-1].detail
                    try:
                        await self.hand_over(rel.vm_uuid, target["target"],
                                             target["target_url"], None)  # fmt: skip
                    except FerryError as exc:
                        log.error("VM %s: cannot hand replication over to %s: %s",
                                  rel.vm_name, target["target"], exc)  # fmt: skip
                continue
            self._spawn(rel.vm_uuid)

    # -- moves: the relationship follows the VM ----------------------------------------

    @contextlib.asynccontextmanager
    async def hold(self, vm_uuid: str) -> AsyncIterator[None]:
        """No cycle runs while the VM moves (a backup job must not race the migration)."""
        async with self.cycle_locks[vm_uuid]:
            yield

    async def hand_over(self, vm_uuid: str, host: str, url: str,
                        thumbprint: str | None) -> None:  # fmt: skip
        """The VM now runs on ``host``: it becomes the primary, the replica is told.

        Called with :meth:`hold` held. Pending points are sent first; if that
        fails the new primary starts by resynchronising, since their files
        stay here. The bitmap itself moved with the VM (``dirty-bitmaps``).
        """
        rel = self._rel(vm_uuid)
        if rel is None:
            return
        state = rel.state
        try:
            async with self.peer(rel) as peer:
                remote = await peer.get(f"/v1/peer/replicas/{vm_uuid}")
                rel = self.cycles.confirm(rel, remote["latest_point"])
                for point in rel.pending:
                    await self.cycles.send(peer, rel, point)
                    rel = self._rel(vm_uuid) or rel
        except FerryError as exc:
            log.warning("VM %s: pending points not sent before the hand-over: %s",
                        rel.vm_name, exc)  # fmt: skip
            if rel.pending and state is S.REPLICATING:
                state = S.RESYNCHRONISING
        moved = rel.model_copy(update={
            "primary": host, "state": state, "pending": (), "in_flight": None})  # fmt: skip
        target = AgentClient(host, url, self._tls, server_name=host, timeout=60)
        async with target:
            if thumbprint is None:
                await target.get("/v1/peer/hello")
                thumbprint = target.thumbprint or ""
            # The replica first, so the new primary's first cycle is welcome there.
            async with self.peer(rel) as peer:
                await peer.call("PATCH", f"/v1/peer/replicas/{vm_uuid}", body={
                    "primary": host, "thumbprint": thumbprint, "primary_url": url})  # fmt: skip
            await target.post("/v1/peer/replications", json.loads(moved.model_dump_json()))
        self.catalog.delete_relationship(vm_uuid)
        await asyncio.to_thread(shutil.rmtree, self.work_dir / vm_uuid, True)
        self.scheduler.cancel(vm_uuid)
        log.info("VM %s: replication handed over to %s (pinned %s)", rel.vm_name, host,
                 thumbprint[:16])  # fmt: skip

    def adopt(self, caller: CertInfo, document: dict[str, Any]) -> dict[str, Any]:
        """The VM arrived here by a move: carry on its replication as the primary."""
        try:
            rel = Relationship.model_validate(document)
        except ValueError as exc:
            raise InvalidInputError(f"invalid relationship: {exc}") from exc
        record = self.catalog.find(rel.vm_uuid)
        if record is None or record.state is VmState.REPLICA or rel.role is not Role.PRIMARY:
            raise NotFoundError(f"VM {rel.vm_name!r} does not run on host {self.config.name!r}")
        if rel.primary != self.config.name:
            raise InvalidInputError(f"the relationship names {rel.primary!r} as primary, "
                                    f"not {self.config.name!r}")  # fmt: skip
        self.catalog.put_relationship(rel)
        self._spawn(rel.vm_uuid)
        log.info("VM %s: replication to %s taken over from %s", rel.vm_name, rel.replica,
                 caller.common_name)  # fmt: skip
        return self.status(rel.vm_name)

    async def shutdown(self) -> None:
        await self.scheduler.shutdown()

    def _spawn(self, vm_uuid: str) -> None:
        self.scheduler.spawn(vm_uuid)

    def _delay(self, vm_uuid: str) -> float | None:
        rel = self._rel(vm_uuid)
        if rel is None or rel.state is S.REMOVED:
            return None
        return rules.cycle_delay(rel.state, rel.last_started, rel.frequency_s, time.time(),
                                 not_before=rel.initial_after)  # fmt: skip

    async def sync_now(self, name: str) -> dict[str, Any]:
        """Run a cycle now and return its outcome (``replication sync``)."""
        record, rel = self.primary_of(name)
        if not rules.is_running(rel.state):
            raise StateError(f"replication of VM {name!r} is {rel.state.value}; resume it first")
        return await self.scheduler.run_now(record.uuid)

    # -- enable / change / end -------------------------------------------------------

    async def enable(self, name: str, *, replica: str, replica_url: str, frequency_s: int,
                     recovery_points: int, initial: InitialMethod, media_dir: str | None,
                     compression: bool,
                     initial_after: float | None = None) -> dict[str, Any]:  # fmt: skip
        record = self.vms.get(name)
        rules.check_frequency(frequency_s)
        rules.check_recovery_points(recovery_points)
        if self.catalog.relationship(record.uuid) is not None:
            raise ConflictError(f"VM {name!r} already has a replication relationship; "
                                "see 'ferry replication status'")  # fmt: skip
        if record.state is VmState.REPLICA:
            raise ConflictError(f"VM {name!r} here is a replica; enable replication on its primary")
        if replica == self.config.name:
            raise InvalidInputError(f"VM {name!r} runs on host {replica!r}; replicate to another")
        for i, disk in enumerate(record.spec.disks):
            if disk.format != "qcow2":
                raise InvalidInputError(
                    f"disk {i} of VM {name!r} is {disk.format}: replication tracks changes in "
                    "qcow2 only; convert it ('ferry vm export' then import) first"
                )
        if record.state not in (VmState.RUNNING, VmState.PAUSED):
            raise StateError(f"VM {name!r} is {record.state.value}: start it first (changes are "
                             "tracked by its running QEMU)")  # fmt: skip
        if initial is InitialMethod.MEDIA:
            if not media_dir or not Path(media_dir).is_absolute():
                raise InvalidInputError("--initial media:DIR needs an absolute DIR")
            if not Path(media_dir).parent.is_dir():
                raise InvalidInputError(f"the parent of media dir {media_dir!r} does not exist")
        rel = Relationship(
            vm_uuid=record.uuid, vm_name=name, role=Role.PRIMARY, primary=self.config.name,
            replica=replica, replica_url=replica_url, frequency_s=frequency_s,
            recovery_points=recovery_points, compression=compression, initial=initial,
            created=time.time(), initial_after=initial_after,
        )  # fmt: skip
        async with self.peer(rel, pin=False) as peer:
            thumbprint = await offer_replica(
                peer, record.spec, sender=self.config.name, receiver=replica,
                level=self.config.functional_level, frequency_s=frequency_s,
                recovery_points=recovery_points, initial=initial.value,
                primary_url=self.url)  # fmt: skip
        rel = rel.model_copy(update={"thumbprint": thumbprint})
        self.catalog.put_relationship(rel)
        log.info("VM %s: replication to %s enabled (every %ss, initial %s, pinned %s)", name,
                 replica, frequency_s, initial.value, thumbprint[:16])  # fmt: skip
        job = None
        if initial is InitialMethod.MEDIA:
            assert media_dir is not None
            job = self.jobs.create(INITIAL_JOB, record.uuid, name, "running", phase="to-media")
            try:
                async with self.cycle_locks[record.uuid]:
                    await self.cycles.to_media(record, rel, Path(media_dir), job)
            except FerryError as exc:
                self.jobs.update(job, "failed", error=str(exc))
                raise
        self._spawn(record.uuid)
        status = self.status(name)
        if job is not None:
            status["job"] = job.view(self.config.name)
        return status

    async def change(self, name: str, *, replica: str | None, replica_url: str | None,
                     frequency_s: int | None, recovery_points: int | None,
                     thumbprint: str | None) -> dict[str, Any]:  # fmt: skip
        record, rel = self.primary_of(name)
        async with self.cycle_locks[record.uuid]:
            rel = self._rel(record.uuid) or rel
            update: dict[str, Any] = {}
            if frequency_s is not None:
                update["frequency_s"] = rules.check_frequency(frequency_s)
            if recovery_points is not None:
                update["recovery_points"] = rules.check_recovery_points(recovery_points)
            if thumbprint is not None:
                tp = thumbprint.lower().replace(":", "")
                if len(tp) != 64 or any(c not in "0123456789abcdef" for c in tp):
                    raise InvalidInputError(f"{thumbprint!r} is not a SHA-256 thumbprint "
                                            "(64 hex digits)")  # fmt: skip
                update["thumbprint"] = tp
            if replica is not None and replica != rel.replica:
                if not replica_url:
                    raise InvalidInputError(f"no address known for host {replica!r}")
                found = await self._replica_on(rel, replica, replica_url)
                if found is None:
                    # Not there yet: the replica VM moves there with its points.
                    async with self.peer(rel) as old:
                        moved = await old.post(f"/v1/peer/replicas/{record.uuid}/move",
                                               {"to": replica, "to_url": replica_url})  # fmt: skip
                    found = str(moved["thumbprint"])
                update.update(replica=replica, replica_url=replica_url,
                              thumbprint=update.get("thumbprint", found))  # fmt: skip
            new = rel.model_copy(update=update)
            if {"frequency_s", "recovery_points"} & update.keys():
                async with self.peer(new) as peer:
                    await peer.call("PATCH", f"/v1/peer/replicas/{record.uuid}", body={
                        "frequency_s": new.frequency_s,
                        "recovery_points": new.recovery_points})  # fmt: skip
            if new.state is S.ERROR and ({"thumbprint", "replica"} & update.keys()):
                new = resume_relationship(new)
            self.catalog.put_relationship(new)
        self._wake_up(record.uuid)
        return self.status(name)

    async def _replica_on(self, rel: Relationship, host: str, url: str) -> str | None:
        """The certificate thumbprint of ``host`` if it holds the VM's replica already."""
        there = rel.model_copy(update={"replica": host, "replica_url": url})
        async with self.peer(there, pin=False) as peer:
            try:
                await peer.get(f"/v1/peer/replicas/{rel.vm_uuid}")
            except NotFoundError:
                return None
            return peer.thumbprint or ""

    def _wake_up(self, vm_uuid: str) -> None:
        self.scheduler.wake(vm_uuid)

    async def pause(self, name: str, *, resume: bool = False) -> dict[str, Any]:
        record, rel = self.primary_of(name)
        async with self.cycle_locks[record.uuid]:
            rel = self._rel(record.uuid) or rel
            if resume:
                rel = resume_relationship(rel)
            else:
                state = rules.transition(rel.state, ReplicationOp.PAUSE, vm=name)
                interrupted = rel.state if rules.is_running(rel.state) else rel.resume_to
                rel = rel.model_copy(update={"state": state, "error": None,
                                             "resume_to": interrupted})  # fmt: skip
            self.catalog.put_relationship(rel)
        if resume:
            self._wake_up(record.uuid)
        return self.status(name)

    async def remove(self, name: str) -> dict[str, Any]:
        record, rel = self.primary_of(name)
        await self.scheduler.stop(record.uuid)
        async with self.cycle_locks[record.uuid]:
            replica_kept: Any = None
            try:
                async with self.peer(rel) as peer:
                    reply = await peer.delete(f"/v1/peer/replicas/{record.uuid}")
                    replica_kept = reply.get("kept_replica_vm")
            except (ConnectionFailedError, NotFoundError, AuthError) as exc:
                log.warning("VM %s: replica host %s not told of the removal: %s", name,
                            rel.replica, exc)  # fmt: skip
            with contextlib.suppress(FerryError):
                if record.state in (VmState.RUNNING, VmState.PAUSED):
                    await self.cycles.tracker(record).drop_bitmap()
            self.catalog.delete_relationship(record.uuid)
            await asyncio.to_thread(shutil.rmtree, self.work_dir / record.uuid, True)
        log.info("VM %s: replication to %s removed", name, rel.replica)
        return {"vm": name, "replica": rel.replica, "removed": True,
                "replica_vm_kept": replica_kept}  # fmt: skip

    # -- reading ----------------------------------------------------------------------

    def _any_rel(self, name: str) -> Relationship:
        """The VM's relationship here, as primary or replica."""
        rel = self.catalog.relationship(self.vms.get(name).uuid)
        if rel is None:
            raise NotFoundError(f"VM {name!r} on host {self.config.name!r} is not replicated")
        return rel

    def status(self, name: str) -> dict[str, Any]:
        rel = self._any_rel(name)
        now = time.time()
        if rel.role is Role.REPLICA:
            return self._replica_status(rel, now)
        cycles = self.catalog.cycles(rel.vm_uuid)
        stats = rules.statistics(cycles, now)
        report = rules.assess_health(rel.state, cycles, now=now, frequency_s=rel.frequency_s,
                                     last_success=rules.latest_point_time(cycles),
                                     since=rel.created)  # fmt: skip
        pending = sum(Path(f).stat().st_size for p in rel.pending for f in p.files
                      if Path(f).exists())  # fmt: skip
        return {
            "vm": rel.vm_name, "role": rel.role.value, "state": rel.state.value,
            "health": report.health.value, "health_reasons": list(report.reasons),
            "primary": rel.primary, "replica": rel.replica, "frequency_s": rel.frequency_s,
            "recovery_points": rel.recovery_points, "compression": rel.compression,
            "initial": rel.initial.value, "thumbprint": rel.thumbprint,
            "last_replication_time": stats["last_replication_time"], "lag_s": stats["lag_s"],
            "success_count": stats["success_count"], "miss_count": stats["miss_count"],
            "failure_count": stats["failure_count"],
            "network_failure_count": stats["network_failure_count"],
            "pending_bytes": pending, "pending_points": len(rel.pending),
            "latest_point": rel.confirmed_point, "error": rel.error,
            "next_cycle": (rules.next_due(rel.last_started, rel.frequency_s, now)
                           if rules.is_running(rel.state) else None),
            "statistics": dict(stats),
        }  # fmt: skip

    def _replica_status(self, rel: Relationship, now: float) -> dict[str, Any]:
        state = self.store.state(rel.vm_uuid)
        latest = state["latest_time"]
        return {
            "vm": rel.vm_name, "role": rel.role.value,
            "state": rel.state.value,
            "health": "normal", "primary": rel.primary, "replica": rel.replica,
            "frequency_s": rel.frequency_s, "recovery_points": rel.recovery_points,
            "last_replication_time": latest, "lag_s": max(0.0, now - latest) if latest else None,
            "points": state["points"], "latest_point": state["latest_point"],
            "replica_bytes": state["bytes"], "thumbprint": rel.thumbprint,
            "origin": rel.origin or None,
        }  # fmt: skip

    async def points(self, name: str) -> list[dict[str, Any]]:
        rel = self._any_rel(name)
        if rel.role is Role.REPLICA:
            return self.store.point_views(rel.vm_uuid)
        async with self.peer(rel) as peer:
            found: list[dict[str, Any]] = await peer.get(f"/v1/peer/replicas/{rel.vm_uuid}/points")
            return found
