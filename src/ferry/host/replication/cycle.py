"""One replication cycle on the primary: cut a recovery point and get it linked.

A cycle, all under the relationship's cycle lock (held by the caller):

1. ask the replica for its latest point, through a client that pins the
   replica's certificate thumbprint, and apply the version rule;
2. resend every *pending* point (a delta QEMU already cut from the bitmap)
   the replica has not linked yet;
3. cut a new point: a full copy (initial copy), a hash-compare patch
   (resynchronisation, also ``--initial existing``) or a delta of the bitmap.
   The cycle is written to the catalog (``in_flight``) before the QMP
   transaction and turned into a pending point once QEMU finished it;
4. stream the point to the replica, which verifies and links it; only its
   answer drops the pending point and its files.

A failure at any step keeps every change: in the bitmap (QEMU merges a failed
backup back) or in a pending file. After an agent restart ``in_flight`` is
settled by asking QEMU about its job; when that cannot tell, or the bitmap is
gone or inconsistent, the relationship resynchronises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from ferry.adapters import block_hashes
from ferry.adapters.catalog import Catalog, VmRecord
from ferry.adapters.cbt import ChangedBlockTracker
from ferry.core import replication as rules
from ferry.core.guest_agent import freeze_due
from ferry.core.relationship import (
    CycleInFlight,
    CycleMode,
    PendingPoint,
    Relationship,
    Role,
    Verdict,
    cycle_mode,
    settle_in_flight,
)
from ferry.core.replication import CycleKind, CycleRecord, ReplicationOp, ReplicationState
from ferry.core.vmstate import VmState
from ferry.errors import (
    AuthError,
    ConnectionFailedError,
    FerryError,
    NotFoundError,
    ReplicationStoppedError,
    ThumbprintMismatchError,
    VersionError,
)
from ferry.host.config import HostConfig
from ferry.host.jobs import Job, JobRegistry
from ferry.host.replication.freeze import FreezeWindow
from ferry.host.replication.sender import PointSender
from ferry.host.vms.service import VmService
from ferry.peer.client import PeerClient
from ferry.peer.replication import HASHES, REPLICA, ReplicaState

log = logging.getLogger(__name__)

S = ReplicationState
INITIAL_JOB = "replication-initial"
RESYNC_JOB = "replication-resync"


async def timed_cycle(catalog: Catalog, vm_uuid: str, vm_name: str, now: float,
                      last_started: float | None, frequency_s: int,
                      body: Awaitable[int | None],
                      stopped: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Run one cycle's ``body`` (bytes sent, or None: nothing to do) and record it.

    Slots missed since ``last_started`` are recorded as misses first. A
    network failure and any other failure are told apart for health; a
    :class:`ReplicationStoppedError` also calls ``stopped`` with the message, which puts
    the relationship in ``error``. Replication and extended replication share it.
    """
    for slot in range(rules.missed_slots(last_started, frequency_s, now)):
        assert last_started is not None
        due = last_started + frequency_s * (slot + 1)
        catalog.add_cycle(vm_uuid, CycleRecord(due, False, CycleKind.MISS, 0, 0.0))
    started = time.monotonic()
    kind, sent, error = CycleKind.SUCCESS, 0, None
    try:
        outcome = await body
        if outcome is None:
            return {"result": "skipped", "reason": "nothing to send yet (initial copy on media, "
                    "scheduled for later, or no new recovery point)"}  # fmt: skip
        sent = outcome
    except ConnectionFailedError as exc:
        kind, error = CycleKind.NETWORK_FAILURE, str(exc)
    except ReplicationStoppedError as exc:
        kind, error = CycleKind.FAILURE, str(exc)
        stopped(error)
    except FerryError as exc:
        kind, error = CycleKind.FAILURE, str(exc)
    duration = time.monotonic() - started
    catalog.add_cycle(vm_uuid, CycleRecord(now, kind is CycleKind.SUCCESS, kind, sent, duration))
    if error:
        log.warning("VM %s: replication cycle failed (%s): %s", vm_name, kind.value, error)
        return {"result": kind.value, "error": error, "duration_s": duration}
    return {"result": "ok", "bytes": sent, "duration_s": duration}


def freeze_counts(rel: Relationship, window: FreezeWindow | None) -> dict[str, Any]:
    """The relationship's freeze figures after ``window`` (None: no freeze was due)."""
    if window is None or not window.attempted:
        return {}
    tried = {"last_freeze_attempt": time.time(), "last_freeze_s": window.frozen_s}
    if window.app_consistent:
        return {**tried, "app_consistent_successes": rel.app_consistent_successes + 1}
    return {**tried, "app_consistent_failures": rel.app_consistent_failures + 1}


@contextlib.asynccontextmanager
async def receiver_session(client: PeerClient, vm_uuid: str, *, level: int, sender: str,
                           receiver: str, vm: str, gone: str,
                           renewed: Callable[[str], str],
                           ) -> AsyncIterator[tuple[PeerClient, ReplicaState]]:  # fmt: skip
    """A cycle's talk with the host that receives the points (replica or extended host).

    Yields the pinned client and the receiver's view of its copy (latest
    point, functional level) after the version rule. What no retry can cure
    becomes :class:`ReplicationStoppedError`: the copy is gone there (``gone``), the
    certificate changed (``renewed(found)`` says what to do), the caller is
    not authorised, or the version rule fails.
    """
    try:
        async with client as peer:
            try:
                remote = await peer.call(REPLICA, uuid=vm_uuid)
            except NotFoundError as exc:
                raise ReplicationStoppedError(gone) from exc
            rules.check_replica_accepts(level, remote.functional_level, primary=sender,
                                        replica=receiver, vm=vm)  # fmt: skip
            yield peer, remote
    except ThumbprintMismatchError as exc:
        raise ReplicationStoppedError(renewed(exc.found)) from exc
    except (AuthError, VersionError) as exc:
        raise ReplicationStoppedError(str(exc)) from exc


@contextlib.asynccontextmanager
async def copy_job(jobs: JobRegistry, kind: str | None, vm_uuid: str, vm_name: str,
                   **detail: Any) -> AsyncIterator[Job | None]:  # fmt: skip
    """A job for an initial copy or resynchronisation (``kind`` None: a plain cycle, no job).

    The job fails with the error if the body raises; the body ends it when done.
    """
    if kind is None:
        yield None
        return
    job = jobs.create(kind, vm_uuid, vm_name, "running", phase="copying", **detail)
    try:
        yield job
    except BaseException as exc:
        jobs.update(job, "failed", error=str(exc) or type(exc).__name__)
        raise


class CycleRunner:
    """Runs cycles for the relationships of one primary host."""

    def __init__(self, vms: VmService, jobs: JobRegistry, *,
                 peer: Callable[[Relationship], PeerClient], work_dir: Path) -> None:  # fmt: skip
        self.vms = vms
        self.jobs = jobs
        self.config: HostConfig = vms.config
        self.catalog: Catalog = vms.catalog
        self.work_dir = work_dir
        self._peer = peer  # a client pinned to the relationship's replica
        self.sender = PointSender(self.config, jobs)  # the host's one: one bandwidth cap
        # Per VM: seconds of each phase of its latest cycle (``replication sync`` shows them).
        self.phases: dict[str, dict[str, float]] = {}

    def primary_rel(self, vm_uuid: str) -> Relationship | None:
        """The VM's relationship if this host is its primary."""
        rel = self.catalog.relationship(vm_uuid)
        return rel if rel is not None and rel.role is Role.PRIMARY else None

    async def run(self, vm_uuid: str) -> dict[str, Any]:
        """One cycle; the caller holds the relationship's cycle lock."""
        rel = self.primary_rel(vm_uuid)
        if rel is None or not rules.is_running(rel.state):
            return {"result": "skipped", "reason": "not replicating"}
        record = self.catalog.find(vm_uuid)
        if record is None or record.state not in (VmState.RUNNING, VmState.PAUSED):
            # An off VM's disks do not change; its bitmap waits in the qcow2.
            return {"result": "skipped", "reason": "the VM is not running"}
        now = time.time()
        last = rel.last_started
        rel = rel.model_copy(update={"last_started": now})
        self.catalog.put_relationship(rel)

        def stopped(error: str) -> None:
            current = self.primary_rel(vm_uuid) or rel
            if rules.allowed(current.state, ReplicationOp.FAIL):
                self.catalog.put_relationship(current.model_copy(update={
                    "state": rules.transition(current.state, ReplicationOp.FAIL),
                    "error": error, "resume_to": current.state}))  # fmt: skip

        outcome = await timed_cycle(self.catalog, vm_uuid, rel.vm_name, now, last,
                                    rel.frequency_s, self._cycle(record, rel), stopped)  # fmt: skip
        if outcome["result"] == "ok":
            outcome["point"] = (self.primary_rel(vm_uuid) or rel).confirmed_point
            outcome["phases_s"] = self.phases.pop(vm_uuid, {})
        return outcome

    async def _cycle(self, record: VmRecord, rel: Relationship) -> int | None:
        name = rel.vm_name
        session = receiver_session(
            self._peer(rel), rel.vm_uuid, level=self.config.functional_level,
            sender=self.config.name, receiver=rel.replica, vm=name,
            gone=f"host {rel.replica!r} no longer holds the replica of VM {name!r}; if it "
            f"moved, run 'ferry replication set {name} --replica NEW-HOST'",
            renewed=lambda found: (
                f"replica host {rel.replica!r} presented certificate thumbprint {found}, but "
                f"replication of VM {name!r} pins {rel.thumbprint}; if its certificate was "
                f"renewed, run 'ferry replication set {name} --certificate-thumbprint {found}'"),
        )  # fmt: skip
        phases = self.phases[rel.vm_uuid] = {}
        started = time.monotonic()
        async with session as (peer, remote):
            phases["ask"] = time.monotonic() - started
            return await self._exchange(record, rel, peer, remote)

    async def _exchange(self, record: VmRecord, rel: Relationship, peer: PeerClient,
                        remote: ReplicaState) -> int | None:  # fmt: skip
        tracker = self.tracker(record)
        rel = self.confirm(rel, remote.latest_point)
        if rel.in_flight is not None:
            rel = await self._settle(rel, tracker)
        sent = 0
        for point in rel.pending:
            sent += await self.send(peer, rel, point)
            rel = self.primary_rel(rel.vm_uuid) or rel
            if point.full or point.resync:
                rel = self._after_point(rel)
        mode, decided = cycle_mode(rel, bitmap_usable=await tracker.bitmap_usable(),
                                   now=time.time())  # fmt: skip
        if decided.state is not rel.state:
            log.info("VM %s: replication is %s", rel.vm_name, decided.state.value)
            self.catalog.put_relationship(decided)
        rel = decided
        if mode is CycleMode.WAIT:
            return None  # media not imported on the replica yet, or scheduled for later
        kind = None
        if mode is not CycleMode.DELTA:
            kind = INITIAL_JOB if rel.state is S.INITIAL_COPY else RESYNC_JOB
        freeze = record.spec.guest_agent and freeze_due(
            rel.app_consistent_every_s, rel.last_freeze_attempt, time.time()
        )
        phases = self.phases.setdefault(rel.vm_uuid, {})
        cut_started = time.monotonic()
        async with copy_job(self.jobs, kind, rel.vm_uuid, rel.vm_name) as job:
            if mode is CycleMode.RESYNC:
                point = await self._resync_point(rel, tracker, peer, job, freeze=freeze)
            else:
                point = await self._cut(rel, tracker, full=mode is CycleMode.FULL, freeze=freeze)
            rel = self.primary_rel(rel.vm_uuid) or rel
            if job is not None:
                self.jobs.update(job, phase="sending")
            send_started = time.monotonic()
            phases["cut"] = send_started - cut_started
            sent += await self.send(peer, rel, point, job)
            phases["send_and_link"] = time.monotonic() - send_started
            if mode is not CycleMode.DELTA:
                self._after_point(self.primary_rel(rel.vm_uuid) or rel)
            if job is not None:
                self.jobs.update(job, "done", phase="done", result="ok", bytes_sent=sent)
        return sent

    def tracker(self, record: VmRecord) -> ChangedBlockTracker:
        return ChangedBlockTracker(self.vms.channel(record), record.spec.disks, vm=record.name,
                                   qemu_img_bin=self.config.qemu_img)  # fmt: skip

    def _after_point(self, rel: Relationship) -> Relationship:
        """An initial copy or resynchronisation point reached the replica."""
        op = {S.INITIAL_COPY: ReplicationOp.INITIAL_COPY_DONE,
              S.RESYNCHRONISING: ReplicationOp.RESYNC_DONE}.get(rel.state)  # fmt: skip
        if op is not None:
            rel = rel.model_copy(update={"state": rules.transition(rel.state, op), "error": None})
            self.catalog.put_relationship(rel)
            log.info("VM %s: replication is %s", rel.vm_name, rel.state.value)
        return rel

    def confirm(self, rel: Relationship, latest: int | None) -> Relationship:
        """Drop pending points the replica already linked."""
        if latest is None:
            return rel
        done = [p for p in rel.pending if p.id <= latest]
        rel = rel.model_copy(update={
            "pending": tuple(p for p in rel.pending if p.id > latest),
            "confirmed_point": latest, "next_point": max(rel.next_point, latest + 1)})  # fmt: skip
        self.catalog.put_relationship(rel)
        for point in done:
            for path in point.files:
                Path(path).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                Path(point.files[0]).parent.rmdir()
        return rel

    async def _settle(self, rel: Relationship, tracker: ChangedBlockTracker) -> Relationship:
        """The agent died during a backup: adopt its files, drop them, or resynchronise."""
        assert rel.in_flight is not None
        flight = rel.in_flight
        verdict = await tracker.outcome(flight.tag)
        while verdict == "running":
            await asyncio.sleep(0.5)
            verdict = await tracker.outcome(flight.tag)
        rel, keep = settle_in_flight(rel, Verdict(verdict))
        if not keep:
            for path in flight.files:
                Path(path).unlink(missing_ok=True)
        log.warning("VM %s: the backup of point %d interrupted by a restart was %s", rel.vm_name,
                    flight.id, verdict)  # fmt: skip
        self.catalog.put_relationship(rel)
        return rel

    async def _cut(self, rel: Relationship, tracker: ChangedBlockTracker, *,
                   full: bool, out_dir: Path | None = None,
                   freeze: bool = False) -> PendingPoint:  # fmt: skip
        """Take a point: a full copy or a delta, recorded in flight first.

        ``freeze``: the transaction inside a :class:`FreezeWindow`; the attempt
        and its outcome are counted in the relationship.
        """
        point_id = rel.next_point
        out = out_dir or self.work_dir / rel.vm_uuid / f"p{point_id}"
        out.mkdir(parents=True, exist_ok=True)
        tag = f"{rel.vm_uuid[:8]}-{point_id}"
        files = tracker.targets(out, "base" if full else f"p{point_id}")
        flight = CycleInFlight(id=point_id, time=time.time(), tag=tag,
                               files=tuple(str(f) for f in files), full=full)  # fmt: skip
        rel = rel.model_copy(update={"in_flight": flight, "next_point": point_id + 1})
        self.catalog.put_relationship(rel)
        window = None
        if freeze:
            socket = self.vms.processes.guest_agent_socket(rel.vm_uuid)
            window = FreezeWindow(socket, vm=rel.vm_name)
        try:
            if full:
                await tracker.full(out, "base", tag=tag, cut=window)
            else:
                await tracker.delta(out, f"p{point_id}", tag=tag, cut=window)
        except FerryError:
            for path in files:
                path.unlink(missing_ok=True)
            rel = rel.model_copy(update={"in_flight": None, **freeze_counts(rel, window)})
            self.catalog.put_relationship(rel)
            raise
        rel = rel.model_copy(update=freeze_counts(rel, window))
        consistent = window is not None and window.app_consistent
        point = PendingPoint(id=point_id, time=flight.time, files=flight.files, full=full,
                             app_consistent=consistent)  # fmt: skip
        if out_dir is None:
            rel = rel.model_copy(update={"in_flight": None, "pending": (*rel.pending, point)})
        else:
            rel = rel.model_copy(update={"in_flight": None})
        self.catalog.put_relationship(rel)
        return point

    async def _resync_point(self, rel: Relationship, tracker: ChangedBlockTracker,
                            peer: PeerClient, job: Job | None, *,
                            freeze: bool = False) -> PendingPoint:  # fmt: skip
        """A new bitmap and full copy here, then only blocks whose hashes differ."""
        scratch = self.work_dir / rel.vm_uuid / "resync"
        scratch.mkdir(parents=True, exist_ok=True)
        full = await self._cut(rel, tracker, full=True, out_dir=scratch, freeze=freeze)
        rel = self.primary_rel(rel.vm_uuid) or rel
        if job is not None:
            self.jobs.update(job, phase="comparing")
        remote = await peer.call(HASHES, query={"block_size": str(block_hashes.BLOCK_SIZE)},
                                 uuid=rel.vm_uuid)  # fmt: skip
        out = self.work_dir / rel.vm_uuid / f"p{full.id}"
        out.mkdir(parents=True, exist_ok=True)
        patches: list[str] = []
        differing = 0
        try:
            for i, (copy, theirs) in enumerate(zip(full.files, remote.disks, strict=True)):
                raw = await block_hashes.read_raw_view(Path(copy), scratch_dir=scratch)
                try:
                    ours = await block_hashes.image_block_hashes(
                        raw, fmt="raw", scratch_dir=scratch
                    )
                    blocks = block_hashes.differing_blocks(ours, theirs)
                    differing += len(blocks)
                    patch = out / f"p{full.id}-disk{i}.qcow2"
                    await block_hashes.build_patch(raw, blocks, patch,
                                                   virtual_size=tracker.disks[i].size)  # fmt: skip
                    patches.append(str(patch))
                finally:
                    raw.unlink(missing_ok=True)
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        log.info("VM %s: resynchronisation found %d differing blocks of %d MiB", rel.vm_name,
                 differing, block_hashes.BLOCK_SIZE // 2**20)  # fmt: skip
        point = PendingPoint(id=full.id, time=full.time, files=tuple(patches), resync=True,
                             app_consistent=full.app_consistent)  # fmt: skip
        rel = rel.model_copy(update={"pending": (*rel.pending, point)})
        self.catalog.put_relationship(rel)
        return point

    async def send(self, peer: PeerClient, rel: Relationship, point: PendingPoint,
                   job: Job | None = None) -> int:  # fmt: skip
        """Stream one point; on the replica's answer, forget it here."""
        reply, sent = await self.sender.send(peer, rel.vm_uuid, point.id, point.time,
                                             [Path(f) for f in point.files],
                                             compress=rel.compression, job=job,
                                             app_consistent=point.app_consistent)  # fmt: skip
        self.confirm(rel, reply.latest_point)
        return sent

    async def to_media(self, record: VmRecord, rel: Relationship, media: Path,
                       job: Job) -> None:  # fmt: skip
        """``--initial media:DIR``: the full copy goes to a folder the admin carries."""
        from ferry.host.replication.initial_media import write_media

        tracker = self.tracker(record)
        media.mkdir(exist_ok=True)
        point = await self._cut(rel, tracker, full=True, out_dir=media)
        self.jobs.update(job, phase="checksumming")
        await write_media(media, rel, point)
        self.jobs.update(job, "done", phase="done", result="ok", folder=str(media))
