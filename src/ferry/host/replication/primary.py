"""The primary side of replication: enable, schedule, change, hand over, report health.

One asyncio task per relationship sleeps until its next cycle is due
(:func:`ferry.core.replication.next_due`), so a slow VM only delays itself;
what a cycle does is :mod:`ferry.host.replication.cycle`. Every cycle, change
and move of a VM holds the VM's disk turn (:mod:`ferry.host.turns`).

Listeners (:class:`RelationshipListener`, e.g. the cluster's publication of a
clustered VM's relationship, :mod:`ferry.host.cluster.replication`) hear of
every change of a relationship this host is the primary of: after each
cycle, enable, change, pause, resume, a takeover, and its removal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ferry.adapters.catalog import VmRecord
from ferry.adapters.pki import CertInfo
from ferry.core import replication as rules
from ferry.core.guest_agent import check_app_consistent_every
from ferry.core.relationship import InitialMethod, Relationship, Role
from ferry.core.relationship import resume as resume_relationship
from ferry.core.replication import ReplicationOp, ReplicationState
from ferry.core.replication.broker import parse_target, refuse_cluster_move
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
from ferry.host.metrics.recorder import NO_METRICS, MetricEvents
from ferry.host.replication import handover
from ferry.host.replication.cycle import INITIAL_JOB, RESYNC_JOB, CycleRunner
from ferry.host.replication.receiver import ReplicaStore
from ferry.host.replication.scheduler import CycleScheduler
from ferry.host.replication.sender import offer_replica
from ferry.host.replication.status import primary_view, replica_view
from ferry.host.vms.service import VmService
from ferry.peer.client import Connector, PeerClient, Timeout
from ferry.peer.replication import (
    MOVE_REPLICA,
    POINTS,
    REMOVE,
    REPLICA,
    UPDATE,
    PrimaryStatus,
    ReplicaChanges,
    ReplicaMoveRequest,
    Takeover,
)

log = logging.getLogger(__name__)

S = ReplicationState
CYCLE_TURN = "a replication cycle"  # what a VM's disk turn is held for (host/turns.py)
CHANGE_TURN = "a replication change"


class RelationshipListener(Protocol):
    """Hears of changes to the relationships this host is the primary of."""

    async def relationship_changed(self, vm_uuid: str) -> None: ...

    async def relationship_removed(self, vm_uuid: str) -> None: ...


class ReplicationService:
    """This host's relationships as a primary, and the status of its replica VMs."""

    def __init__(self, vms: VmService, jobs: JobRegistry, store: ReplicaStore,
                 peers: Connector) -> None:  # fmt: skip
        self.vms = vms
        self.jobs = jobs
        self.store = store
        self.peers = peers
        self.config = vms.config
        self.catalog = vms.catalog
        self.cycles = CycleRunner(vms, jobs, peer=self.peer, work_dir=self.work_dir)
        self.turns = vms.turns
        self.scheduler = CycleScheduler(
            "replicate", delay=self._delay, cycle=self._cycle,
            turn=lambda key: self.turns.turn(key, CYCLE_TURN),
        )  # fmt: skip
        self.listeners: list[RelationshipListener] = []
        self.metrics: MetricEvents = NO_METRICS  # counts every cycle's end (the agent's)

    def recover(self) -> None:
        """After a restart: a copy job left ``running`` has no task any more, and nothing
        else would end it (its cancel is refused), so it is failed here; the relationship
        keeps its state, so the next cycle starts the copy over under a new job."""
        for job in self.jobs.all():
            if job.kind not in (INITIAL_JOB, RESYNC_JOB) or job.state != "running":
                continue
            if job.detail.get("phase") == "to-media":
                why = ("the agent restarted during the copy to media; the folder is "
                       "incomplete: remove replication and enable it again")  # fmt: skip
            else:
                why = "the agent restarted during the copy; the next cycle starts it over"
            self.jobs.update(job, "failed", error=why)

    async def _cycle(self, vm_uuid: str) -> dict[str, Any]:
        before = self._rel(vm_uuid)
        outcome = await self.cycles.run(vm_uuid)
        self.metrics.replication_cycle(before, self._rel(vm_uuid), outcome)
        await self.changed(vm_uuid)
        return outcome

    async def changed(self, vm_uuid: str, *, removed: bool = False) -> None:
        """Tell the listeners; one's failure is logged and stops nothing."""
        for listener in list(self.listeners):
            tell: Callable[[str], Awaitable[None]] = (
                listener.relationship_removed if removed else listener.relationship_changed
            )
            try:
                await tell(vm_uuid)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("VM %s: a replication listener failed", vm_uuid)

    @property
    def url(self) -> str:
        address, port = self.config.address
        return f"https://{address}:{port}"

    @property
    def work_dir(self) -> Path:
        return self.config.data_dir / "replication"

    def _rel(self, vm_uuid: str) -> Relationship | None:
        return self.cycles.primary_rel(vm_uuid)

    def _check_continuous(self, frequency_s: int, vm_uuid: str, name: str) -> None:
        """At most MAX_CONTINUOUS_VMS VMs of this host replicate continuously."""
        others = sum(1 for rel in self.catalog.relationships()
                     if rel.role is Role.PRIMARY and rel.vm_uuid != vm_uuid
                     and rel.state is not ReplicationState.REMOVED
                     and rules.is_continuous(rel.frequency_s))  # fmt: skip
        rules.check_continuous_slot(frequency_s, others, host=self.config.name, vm=name)

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

    def peer(self, rel: Relationship, *, pin: bool = True) -> PeerClient:
        """A client for the relationship's replica host, pinned to its certificate."""
        return self.peers.connect(rel.replica, rel.replica_url, timeout=Timeout.TRANSFER,
                                  pin=rel.thumbprint if pin else None)  # fmt: skip

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
                await handover.after_restart(self, rel)
                continue
            self._spawn(rel.vm_uuid)

    # -- moves: the relationship follows the VM ----------------------------------------

    async def hand_over(self, vm_uuid: str, host: str, url: str,
                        thumbprint: str | None) -> None:  # fmt: skip
        """The VM now runs on ``host`` (see :func:`ferry.host.replication.handover.hand_over`)."""
        await handover.hand_over(self, vm_uuid, host, url, thumbprint)

    async def adopt(self, caller: CertInfo, takeover: Takeover) -> PrimaryStatus:
        """The VM arrived here by a move (see :func:`ferry.host.replication.handover.adopt`)."""
        status = handover.adopt(self, caller, takeover)
        await self.changed(takeover.vm_uuid)
        return status

    async def shutdown(self) -> None:
        await self.scheduler.shutdown()

    def _spawn(self, vm_uuid: str) -> None:
        self.scheduler.spawn(vm_uuid)

    def _delay(self, vm_uuid: str) -> float | None:
        rel = self._rel(vm_uuid)
        if rel is None or rel.state is S.REMOVED:
            return None
        record = self.catalog.find(vm_uuid)
        live = record is not None and record.state in (VmState.RUNNING, VmState.PAUSED)
        return rules.cycle_delay(rel.state, rel.last_started, rel.frequency_s, time.time(),
                                 not_before=rel.initial_after, vm_live=live)  # fmt: skip

    async def sync_now(self, name: str) -> dict[str, Any]:
        """Run a cycle now and return its outcome (``replication sync``)."""
        record, rel = self.primary_of(name)
        if not rules.is_running(rel.state):
            raise StateError(f"replication of VM {name!r} is {rel.state.value}; resume it first")
        return await self.scheduler.run_now(record.uuid)

    # -- enable / change / end -------------------------------------------------------

    async def enable(self, name: str, *, replica: str, replica_url: str, frequency_s: int,
                     recovery_points: int, initial: InitialMethod, media_dir: str | None,
                     compression: bool, initial_after: float | None = None,
                     network_map: Mapping[str, str] | None = None,
                     app_consistent_every_s: int | None = None) -> dict[str, Any]:  # fmt: skip
        """``network_map``: the VM's networks -> the replica host's, for failovers there;
        the replica refuses the offer (one line, nothing kept) if it lacks a network."""
        record = self.vms.get(name)
        rules.check_frequency(frequency_s)
        self._check_continuous(frequency_s, record.uuid, name)
        rules.check_recovery_points(recovery_points)
        app_every = check_app_consistent_every(app_consistent_every_s, record.spec)
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
            network_map=dict(network_map or {}), app_consistent_every_s=app_every,
        )  # fmt: skip
        target = parse_target(replica)  # cluster:C: the replica broker (peer/broker.py)
        async with self.peer(rel, pin=False) as peer:
            thumbprint = await offer_replica(
                peer, record.spec, sender=self.config.name, level=self.config.functional_level,
                frequency_s=frequency_s, recovery_points=recovery_points, initial=initial,
                primary_url=self.url, network_map=rel.network_map,
                cluster=target.name if target.cluster else "")  # fmt: skip
        rel = rel.model_copy(update={"thumbprint": thumbprint})
        self.catalog.put_relationship(rel)
        log.info("VM %s: replication to %s enabled (every %ss, initial %s, pinned %s)", name,
                 replica, frequency_s, initial.value, thumbprint[:16])  # fmt: skip
        job = None
        if initial is InitialMethod.MEDIA:
            assert media_dir is not None
            job = self.jobs.create(INITIAL_JOB, record.uuid, name, "running", phase="to-media")
            try:
                async with self.turns.turn(record.uuid, CHANGE_TURN):
                    await self.cycles.to_media(record, rel, Path(media_dir), job)
            except FerryError as exc:
                self.jobs.update(job, "failed", error=str(exc))
                raise
        self._spawn(record.uuid)
        await self.changed(record.uuid)
        status = self.status(name)
        if job is not None:
            status["job"] = job.view(self.config.name)
        return status

    async def change(self, name: str, *, replica: str | None, replica_url: str | None,
                     frequency_s: int | None, recovery_points: int | None,
                     thumbprint: str | None,
                     network_map: Mapping[str, str] | None = None,
                     app_consistent_every_s: int | None = None) -> dict[str, Any]:  # fmt: skip
        """``network_map`` replaces the whole map the replica's failovers use."""
        record, rel = self.primary_of(name)
        async with self.turns.turn(record.uuid, CHANGE_TURN):
            rel = self._rel(record.uuid) or rel
            update: dict[str, Any] = {}
            if frequency_s is not None:
                update["frequency_s"] = rules.check_frequency(frequency_s)
                self._check_continuous(frequency_s, record.uuid, name)
            if recovery_points is not None:
                update["recovery_points"] = rules.check_recovery_points(recovery_points)
            if thumbprint is not None:
                tp = thumbprint.lower().replace(":", "")
                if len(tp) != 64 or any(c not in "0123456789abcdef" for c in tp):
                    raise InvalidInputError(f"{thumbprint!r} is not a SHA-256 thumbprint "
                                            "(64 hex digits)")  # fmt: skip
                update["thumbprint"] = tp
            if replica is not None and replica != rel.replica:
                refuse_cluster_move(name, rel.replica, replica)
                if not replica_url:
                    raise InvalidInputError(f"no address known for host {replica!r}")
                found = await self._replica_on(rel, replica, replica_url)
                if found is None:
                    # Not there yet: the replica VM moves there with its points.
                    async with self.peer(rel) as old:
                        there = ReplicaMoveRequest(to=replica, to_url=replica_url)
                        found = (await old.call(MOVE_REPLICA, there, uuid=record.uuid)).thumbprint
                update.update(replica=replica, replica_url=replica_url,
                              thumbprint=update.get("thumbprint", found))  # fmt: skip
            if network_map is not None:
                update["network_map"] = dict(network_map)
            if app_consistent_every_s is not None:  # 0: off
                update["app_consistent_every_s"] = check_app_consistent_every(
                    app_consistent_every_s or None, record.spec
                )
                update["last_freeze_attempt"] = None  # the next cycle freezes
            new = rel.model_copy(update=update)
            if {"frequency_s", "recovery_points", "network_map"} & update.keys():
                terms = ReplicaChanges(frequency_s=new.frequency_s,
                                       recovery_points=new.recovery_points)  # fmt: skip
                if network_map is not None:  # the replica maps the NICs as we have them
                    terms = terms.model_copy(update={"network_map": new.network_map,
                                                     "nics": list(record.spec.nics)})  # fmt: skip
                async with self.peer(new) as peer:
                    await peer.call(UPDATE, terms, uuid=record.uuid)
            if new.state is S.ERROR and ({"thumbprint", "replica"} & update.keys()):
                new = resume_relationship(new)
            self.catalog.put_relationship(new)
        self._wake_up(record.uuid)
        await self.changed(record.uuid)
        return self.status(name)

    async def _replica_on(self, rel: Relationship, host: str, url: str) -> str | None:
        """The certificate thumbprint of ``host`` if it holds the VM's replica already."""
        there = rel.model_copy(update={"replica": host, "replica_url": url})
        async with self.peer(there, pin=False) as peer:
            try:
                await peer.call(REPLICA, uuid=rel.vm_uuid)
            except NotFoundError:
                return None
            return peer.thumbprint or ""

    def _wake_up(self, vm_uuid: str) -> None:
        self.scheduler.wake(vm_uuid)

    async def pause(self, name: str, *, resume: bool = False) -> dict[str, Any]:
        record, rel = self.primary_of(name)
        async with self.turns.turn(record.uuid, CHANGE_TURN):
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
        await self.changed(record.uuid)
        return self.status(name)

    async def remove(self, name: str) -> dict[str, Any]:
        record, rel = self.primary_of(name)
        await self.scheduler.stop(record.uuid)
        async with self.turns.turn(record.uuid, CHANGE_TURN):
            replica_kept: bool | None = None
            try:
                async with self.peer(rel) as peer:
                    replica_kept = (await peer.call(REMOVE, uuid=record.uuid)).kept_replica_vm
            except (ConnectionFailedError, NotFoundError, AuthError) as exc:
                log.warning("VM %s: replica host %s not told of the removal: %s", name,
                            rel.replica, exc)  # fmt: skip
            with contextlib.suppress(FerryError):
                if record.state in (VmState.RUNNING, VmState.PAUSED):
                    await self.cycles.tracker(record).drop_bitmap()
            self.catalog.delete_relationship(record.uuid)
            await asyncio.to_thread(shutil.rmtree, self.work_dir / record.uuid, True)
        log.info("VM %s: replication to %s removed", name, rel.replica)
        await self.changed(record.uuid, removed=True)
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
            return replica_view(rel, self.store.state(rel.vm_uuid), now)
        return primary_view(rel, self.catalog.cycles(rel.vm_uuid), now)

    async def points(self, name: str) -> list[dict[str, Any]]:
        rel = self._any_rel(name)
        if rel.role is Role.REPLICA:
            found = self.store.point_views(rel.vm_uuid)
        else:
            async with self.peer(rel) as peer:
                found = await peer.call(POINTS, uuid=rel.vm_uuid)
        return [point.model_dump() for point in found.root]
