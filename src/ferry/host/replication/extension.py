"""Extended replication: a replica host replicates a VM's recovery points onward.

``ferry replication extend VM --to HOST`` runs on the replica host (R) of a
VM whose primary is P. R offers the VM to the extended host (E) exactly as a
primary offers it to a replica, so E keeps an ordinary replica relationship
(its primary is R, its ``origin`` is P) and everything E can do as a replica
works there: recovery points, test failover, failover.

A cycle (every 5 or 15 minutes, never more often than P feeds R):

1. asks E for its latest point, through a client pinned to E's certificate,
   and applies the version rule (E runs R's level or newer);
2. under R's store lock, cuts what E lacks: the first time a flattened copy
   of R's latest point (the initial copy), afterwards the overlays of every
   point newer than E's latest, combined into one
   (:func:`ferry.adapters.point_transfer.combine_overlays`);
3. streams it to E with the id of R's latest point, through the same delta
   stream and bandwidth cap as a primary's cycle.

R's retention leaves every point newer than E's latest as a separate file
(:func:`ferry.core.relationship.extension_pin`), so the next cut can always
be made. The extension lives and dies with R's replica relationship: when
that ends (removed, or reversed after a failover), the next look at it tells
E to end its side, and E keeps its copy as a plain VM that is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ferry import __version__
from ferry.adapters import qemu_img
from ferry.adapters.catalog import VmRecord
from ferry.adapters.point_transfer import combine_overlays
from ferry.core import replication as rules
from ferry.core.relationship import Extension, Relationship, Role, extension_confirmed
from ferry.core.replication import PointInfo, ReplicationOp, ReplicationState
from ferry.core.replication.broker import refuse_cluster_extension
from ferry.errors import (
    AuthError,
    ConflictError,
    ConnectionFailedError,
    FerryError,
    InvalidInputError,
    NotFoundError,
    ReplicationStoppedError,
    StateError,
    ThumbprintMismatchError,
)
from ferry.host.jobs import Job, JobRegistry
from ferry.host.replication.cycle import (
    INITIAL_JOB,
    CycleRunner,
    copy_job,
    receiver_session,
    timed_cycle,
)
from ferry.host.replication.receiver import ReplicaStore, disk_file
from ferry.host.replication.scheduler import CycleScheduler
from ferry.host.replication.sender import offer_replica
from ferry.peer.client import Connector, PeerClient, Timeout
from ferry.peer.replication import REMOVE, UPDATE, ReplicaChanges

log = logging.getLogger(__name__)

S = ReplicationState


class ExtensionService:
    """This host's extensions: replica VMs it replicates onward."""

    def __init__(self, store: ReplicaStore, jobs: JobRegistry, cycles: CycleRunner,
                 url: str, peers: Connector) -> None:  # fmt: skip
        self.store = store
        self.peers = peers
        self.jobs = jobs
        self.cycles = cycles
        self.url = url
        self.config = store.config
        self.catalog = store.catalog
        self.scheduler = CycleScheduler("extend", delay=self._delay, cycle=self._cycle)
        # Hear of each extend and cycle (the replica broker publishes the extension to its
        # cluster's record; created=True after an extend).
        self.listeners: list[Callable[..., Awaitable[None]]] = []
        # Asked when the extended host refuses this host as the primary (the replica
        # broker: this node took the replica over and its claim at E did not land):
        # True if it claimed the primary's place again, so the cycle is tried once more.
        self.reclaim: Callable[[str], Awaitable[bool]] | None = None

    async def _changed(self, vm_uuid: str, *, created: bool = False) -> None:
        for listener in self.listeners:
            try:
                await listener(vm_uuid, created=created)
            except FerryError as exc:
                log.warning("VM %s: extension listener: %s", vm_uuid, exc)

    @property
    def work_dir(self) -> Path:
        return self.config.data_dir / "extension"

    def _peer(self, ext: Extension, *, pin: bool = True) -> PeerClient:
        """A client for the extended host, pinned to its certificate once it is known."""
        return self.peers.connect(ext.host, ext.url, timeout=Timeout.TRANSFER,
                                  pin=ext.thumbprint if pin else None)  # fmt: skip

    def _replica(self, name: str) -> tuple[VmRecord, Relationship]:
        return self.store.replica_of(name, commands="extended replication")

    def extension_of(self, name: str) -> Extension:
        record, _ = self._replica(name)
        ext = self.catalog.extension(record.uuid)
        if ext is None:
            raise NotFoundError(f"the replica of VM {name!r} on host {self.config.name!r} is "
                                f"not extended; 'ferry replication extend {name} --to HOST' "
                                "extends it")  # fmt: skip
        return ext

    # -- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        for ext in self.catalog.extensions():
            self.scheduler.spawn(ext.vm_uuid)

    async def shutdown(self) -> None:
        await self.scheduler.shutdown()

    def _delay(self, vm_uuid: str) -> float | None:
        ext = self.catalog.extension(vm_uuid)
        if ext is None:
            return None
        rel = self.catalog.relationship(vm_uuid)
        if rel is None or rel.role is not Role.REPLICA:
            return 0.0  # the replica relationship ended: the next cycle ends the extension
        return rules.cycle_delay(ext.state, ext.last_started, ext.frequency_s, time.time())

    async def sync_now(self, name: str) -> dict[str, Any]:
        ext = self.extension_of(name)
        if not rules.is_running(ext.state):
            raise StateError(f"extended replication of VM {name!r} is {ext.state.value}: "
                             f"{ext.error or 'not running'}")  # fmt: skip
        return await self.scheduler.run_now(ext.vm_uuid)

    # -- extend / end --------------------------------------------------------------------

    async def extend(self, name: str, *, to: str, url: str, frequency_s: int | None,
                     recovery_points: int | None) -> dict[str, Any]:  # fmt: skip
        record, rel = self._replica(name)
        refuse_cluster_extension(name, to)
        if rel.origin:
            raise InvalidInputError(
                f"the copy of VM {name!r} on host {self.config.name!r} is itself an extended "
                f"replica (of {rel.primary!r}); extend from the first replica only"
            )
        existing = self.catalog.extension(record.uuid)
        if existing is not None:
            raise ConflictError(f"VM {name!r} is already extended to {existing.host!r}; "
                                f"'ferry replication extend {name} --remove' ends that "
                                "first")  # fmt: skip
        if to in (self.config.name, rel.primary):
            raise InvalidInputError(f"host {to!r} already holds VM {name!r} (as "
                                    f"{'replica' if to == self.config.name else 'primary'}); "
                                    "extend to a third host")  # fmt: skip
        if rel.state in (S.FAILED_OVER, S.REMOVED):
            raise StateError(f"the replica of VM {name!r} is {rel.state.value}; nothing to extend")
        frequency = rules.check_extended_frequency(
            frequency_s if frequency_s is not None
            else rules.default_extended_frequency(rel.frequency_s),
            rel.frequency_s, vm=name)  # fmt: skip
        keep = rules.check_recovery_points(
            rel.recovery_points if recovery_points is None else recovery_points
        )
        ext = Extension(vm_uuid=record.uuid, vm_name=name, host=to, url=url,
                        frequency_s=frequency, recovery_points=keep,
                        created=time.time())  # fmt: skip
        async with self.scheduler.locks[record.uuid], self._peer(ext, pin=False) as peer:
            thumbprint = await offer_replica(
                peer, record.spec, sender=self.config.name, level=self.config.functional_level,
                frequency_s=frequency, recovery_points=keep, primary_url=self.url,
                origin=rel.primary, origin_url=rel.primary_url)  # fmt: skip
            ext = ext.model_copy(update={"thumbprint": thumbprint})
            self.catalog.put_extension(ext)
        log.info("VM %s: extended replication to %s every %ss (pinned %s)", name, to, frequency,
                 ext.thumbprint[:16])  # fmt: skip
        await self._changed(record.uuid, created=True)
        self.scheduler.wake(record.uuid)
        return self.view(record.uuid) or {}

    async def remove(self, name: str) -> dict[str, Any]:
        ext = self.extension_of(name)
        await self.scheduler.stop(ext.vm_uuid)
        async with self.scheduler.locks[ext.vm_uuid]:
            kept = await self._end(ext, "removed by an admin")
        return {"vm": name, "extended": ext.host, "removed": True, "extended_vm_kept": kept}

    async def _end(self, ext: Extension, why: str) -> bool | None:
        """Tell the extended host (it keeps its copy as a plain VM) and forget the extension."""
        kept: bool | None = None
        try:
            async with self._peer(ext) as peer:
                kept = (await peer.call(REMOVE, uuid=ext.vm_uuid)).kept_replica_vm
        except (ConnectionFailedError, NotFoundError, AuthError) as exc:
            log.warning("VM %s: extended host %s not told that the extension ended: %s",
                        ext.vm_name, ext.host, exc)  # fmt: skip
        self.catalog.delete_extension(ext.vm_uuid)
        await asyncio.to_thread(shutil.rmtree, self.work_dir / ext.vm_uuid, True)
        if self.catalog.relationship(ext.vm_uuid) is not None:
            with contextlib.suppress(NotFoundError):
                await self.store.retain(ext.vm_uuid)  # merges the extension held back
        log.info("VM %s: extended replication to %s ended (%s)", ext.vm_name, ext.host, why)
        return kept

    # -- cycles --------------------------------------------------------------------------

    async def _cycle(self, vm_uuid: str) -> dict[str, Any]:
        ext = self.catalog.extension(vm_uuid)
        if ext is None:
            return {"result": "skipped", "reason": "not extended"}
        rel = self.catalog.relationship(vm_uuid)
        if rel is None or rel.role is not Role.REPLICA:
            await self._end(ext, "this host no longer holds the VM's replica")
            return {"result": "skipped", "reason": "the replica relationship ended"}
        if not rules.is_running(ext.state):
            return {"result": "skipped", "reason": f"extended replication is {ext.state.value}"}
        now = time.time()
        last = ext.last_started
        ext = ext.model_copy(update={"last_started": now})
        self.catalog.put_extension(ext)

        def stopped(error: str) -> None:
            current = self.catalog.extension(vm_uuid) or ext
            if rules.allowed(current.state, ReplicationOp.FAIL):
                self.catalog.put_extension(current.model_copy(update={
                    "state": rules.transition(current.state, ReplicationOp.FAIL),
                    "error": error}))  # fmt: skip

        outcome = await timed_cycle(self.catalog, vm_uuid, ext.vm_name, now, last,
                                    ext.frequency_s, self._forward_claimed(ext, rel),
                                    stopped)  # fmt: skip
        if outcome["result"] == "ok":
            outcome["point"] = (self.catalog.extension(vm_uuid) or ext).confirmed_point
        await self._changed(vm_uuid)
        return outcome

    async def _forward_claimed(self, ext: Extension, rel: Relationship) -> int | None:
        """:meth:`_forward`; refused as the primary by the extended host, once more after
        :attr:`reclaim` claimed the place again (a claim lost when this host took over)."""
        try:
            return await self._forward(ext, rel)
        except ReplicationStoppedError as exc:
            cause = exc.__cause__  # the session's refusal (a pin mismatch is not this)
            if not isinstance(cause, AuthError) or isinstance(cause, ThumbprintMismatchError):
                raise
            try:
                claimed = self.reclaim is not None and await self.reclaim(ext.vm_uuid)
            except FerryError as why:
                log.warning("VM %s: extended host %s: the claim again failed: %s",
                            ext.vm_name, ext.host, why)  # fmt: skip
                claimed = False
            if not claimed:
                raise exc from None
            log.info("VM %s: extended host %s refused this host as its primary (%s); "
                     "claimed again", ext.vm_name, ext.host, exc)  # fmt: skip
            return await self._forward(self.catalog.extension(ext.vm_uuid) or ext, rel)

    async def _forward(self, ext: Extension, rel: Relationship) -> int | None:
        name = ext.vm_name
        again = f"'ferry replication extend {name} --remove' then extend again"
        session = receiver_session(
            self._peer(ext), ext.vm_uuid, level=self.config.functional_level,
            sender=self.config.name, receiver=ext.host, vm=name,
            gone=f"host {ext.host!r} no longer holds the extended replica of VM {name!r}; "
            + again,
            renewed=lambda found: (
                f"extended host {ext.host!r} presented certificate thumbprint {found}, but the "
                f"extension of VM {name!r} pins {ext.thumbprint}; if its certificate was "
                f"renewed, {again}"),
        )  # fmt: skip
        try:
            async with session as (peer, remote):
                ext = self._confirmed(ext, remote.latest_point)
                if remote.origin != rel.primary:  # the VM moved between primaries
                    moved = ReplicaChanges(origin=rel.primary, origin_url=rel.primary_url)
                    await peer.call(UPDATE, moved, uuid=ext.vm_uuid)
                await self.store.retain(ext.vm_uuid)  # what E now holds may be merged here
                kind = INITIAL_JOB if ext.confirmed_point is None else None
                async with copy_job(self.jobs, kind, ext.vm_uuid, name, target=ext.host) as job:
                    cut = await self._cut(ext, job)
                    if cut is None:
                        if job is not None:
                            self.jobs.update(job, "done", phase="done", result="nothing yet")
                        return None
                    point, files = cut
                    if job is not None:
                        self.jobs.update(job, phase="sending")
                    # The point reads as the replica's point of that id: its flag holds.
                    frozen = point.id in self.store.relationship(ext.vm_uuid).app_consistent_points
                    reply, sent = await self.cycles.sender.send(
                        peer, ext.vm_uuid, point.id, point.time, files, compress=True,
                        job=job, app_consistent=frozen)  # fmt: skip
                    if job is not None:
                        self.jobs.update(job, "done", phase="done", result="ok", bytes_sent=sent)
                self._confirmed(self.catalog.extension(ext.vm_uuid) or ext, reply.latest_point)
        finally:
            await asyncio.to_thread(shutil.rmtree, self.work_dir / ext.vm_uuid, True)
        await self.store.retain(ext.vm_uuid)
        return sent

    def _confirmed(self, ext: Extension, latest: int | None) -> Extension:
        ext = extension_confirmed(ext, latest)
        self.catalog.put_extension(ext)
        return ext

    async def _cut(self, ext: Extension, job: Job | None) -> tuple[PointInfo, list[Path]] | None:
        """What the extended host lacks, as one file per disk (None: nothing new).

        Runs under the store lock, so no point is linked or merged meanwhile;
        ``sending_point`` is recorded before the lock is let go, so retention
        keeps the overlays of the next cut.
        """
        out = self.work_dir / ext.vm_uuid
        async with self.store.lock(ext.vm_uuid):
            chain = self.catalog.points(ext.vm_uuid)
            if not chain or chain[-1].id < 0:
                return None  # the replica has no recovery point yet
            latest = chain[-1]
            confirmed = ext.confirmed_point
            if confirmed is not None and latest.id <= confirmed:
                return None
            rel = self.store.relationship(ext.vm_uuid)
            storage = Path(rel.storage)
            sizes = [d.size for d in self.catalog.get(ext.vm_uuid).spec.disks]
            disks = len(sizes)
            await asyncio.to_thread(shutil.rmtree, out, True)
            out.mkdir(parents=True)
            files: list[Path] = []
            if confirmed is None:
                for i in range(disks):
                    target = out / f"base-disk{i}.qcow2"

                    def progress(fraction: float, disk: int = i) -> None:
                        if job is not None:
                            done = sum(sizes[:disk]) + int(fraction * sizes[disk])
                            self.jobs.update(job, progress={"bytes": done, "total": sum(sizes)})

                    await qemu_img.convert_to_qcow2(disk_file(storage, latest.file, i), target,
                                                    src_format="qcow2", progress=progress,
                                                    qemu_img=self.config.qemu_img)  # fmt: skip
                    files.append(target)
            else:
                below = [p for p in chain if p.id == confirmed]
                if not below:
                    raise ReplicationStoppedError(
                        f"recovery point {confirmed} that host {ext.host!r} holds is gone here; "
                        f"'ferry replication extend {ext.vm_name} --remove' then extend again"
                    )
                newer = [p for p in chain if p.id > confirmed]
                for i in range(disks):
                    target = out / f"p{latest.id}-disk{i}.qcow2"
                    await combine_overlays([disk_file(storage, p.file, i) for p in newer],
                                           disk_file(storage, below[0].file, i), target,
                                           qemu_img_bin=self.config.qemu_img)  # fmt: skip
                    files.append(target)
            self.catalog.put_extension(ext.model_copy(update={"sending_point": latest.id}))
        return latest, files

    # -- reading -------------------------------------------------------------------------

    def view(self, vm_uuid: str) -> dict[str, Any] | None:
        """The extension as ``replication status`` on the replica host shows it."""
        ext = self.catalog.extension(vm_uuid)
        if ext is None:
            return None
        now = time.time()
        cycles = self.catalog.cycles(vm_uuid)
        stats = rules.statistics(cycles, now)
        report = rules.assess_health(ext.state, cycles, now=now, frequency_s=ext.frequency_s,
                                     last_success=rules.latest_point_time(cycles),
                                     since=ext.created)  # fmt: skip
        return {
            "vm": ext.vm_name, "from": self.config.name, "host": ext.host,
            "version": __version__, "state": ext.state.value,
            "health": report.health.value, "health_reasons": list(report.reasons),
            "frequency_s": ext.frequency_s, "recovery_points": ext.recovery_points,
            "latest_point": ext.confirmed_point, "thumbprint": ext.thumbprint,
            "last_replication_time": stats["last_replication_time"], "lag_s": stats["lag_s"],
            "success_count": stats["success_count"], "miss_count": stats["miss_count"],
            "failure_count": stats["failure_count"],
            "network_failure_count": stats["network_failure_count"], "error": ext.error,
        }  # fmt: skip
