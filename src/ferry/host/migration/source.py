"""The source's move job: the phases of moving a running VM to another host.

The job walks :mod:`ferry.core.migration`'s phases (queued, preparing,
copying-disks, copying-memory, switching-over, then done, failed or
cancelled); each phase asks the destination over the peer protocol
(:mod:`ferry.peer.migration`) or the source QEMU through the migration
adapter (:mod:`ferry.adapters.migration`) to do its part. What it has done
so far is a :class:`~ferry.host.migration.attempt.MoveAttempt`; any failure
or cancellation before switch-over undoes exactly that, so the VM runs on
here as before and the destination is told to clean up. At switch-over the
destination resumes first; only then does the source let go of the VM, so
there are never two running copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ferry.adapters.catalog import VmRecord
from ferry.adapters.migration import (
    MigrationInfo,
    MigrationStatus,
    MirrorProgress,
    OutgoingMigration,
)
from ferry.adapters.migration.convergence import Convergence
from ferry.adapters.migration.run_state import run_state_events
from ferry.core import log_context, vmstate
from ferry.core.migration import (
    IncomingState,
    Phase,
    Storage,
    advance,
    cancellable,
    is_final,
    locate_on_volume,
)
from ferry.core.network import apply_network_map
from ferry.core.spec import VmSpec
from ferry.core.vmstate import VmOp, VmState
from ferry.errors import (
    ConflictError,
    ConnectionFailedError,
    FerryError,
    InvalidInputError,
    MoveFailedError,
    NotFoundError,
    StateError,
)
from ferry.host.jobs import Job, JobRegistry
from ferry.host.migration.attempt import KERNEL_FILES, MOVE, MoveAttempt
from ferry.host.migration.pause import (
    COMPLETED,
    CONTINUED,
    MIRRORS_DONE,
    STOPPED,
    PauseMarks,
    measure_offset,
)
from ferry.host.vms.service import VmService
from ferry.peer import migration as wire
from ferry.peer.client import Connector, PeerClient

log = logging.getLogger(__name__)

PEER_CHECK_S = 1.0  # how often a long copy asks whether the destination still receives
PEER_GRACE_S = 4.0  # the destination agent may be silent this long mid-copy
OUTCOME_WAIT_S = 60.0  # how long to learn the destination's fate after switch-over
ABORT_WAIT_S = 30.0  # the destination's abort waits for its prepare or launch under way


class MoveObserver(Protocol):
    """What else must follow a VM that moves (its replication relationship)."""

    async def hand_over(self, vm_uuid: str, host: str, url: str,
                        thumbprint: str | None) -> None: ...  # fmt: skip


class SwitchGuard(Protocol):
    """A clustered VM's owner changing hands at the switch-over (host/cluster/switchover.py)."""

    async def before_switch(self, vm_uuid: str, target: str, job: str) -> None: ...

    async def after_switch(self, vm_uuid: str, target: str, job: str, *, resumed: bool) -> bool: ...


class PeerWatch:
    """Fails a long wait once the destination gave up or has been silent too long."""

    def __init__(self, peer: PeerClient, job_id: str) -> None:
        self.peer = peer
        self.job_id = job_id
        self.last_ok = time.monotonic()

    async def check(self) -> None:
        if time.monotonic() - self.last_ok < PEER_CHECK_S:
            return
        try:
            async with asyncio.timeout(2):  # not wait_for: it may lose a cancel (3.11)
                outcome = await self.peer.call(wire.STATUS, id=self.job_id)
        except (FerryError, TimeoutError):
            if time.monotonic() - self.last_ok > PEER_GRACE_S:
                raise MoveFailedError(
                    f"the agent of host {self.peer.name!r} stopped answering"
                ) from None
            return
        if outcome.state is IncomingState.ABORTED:
            raise MoveFailedError(f"host {self.peer.name!r} gave up receiving: {outcome.error}")
        self.last_ok = time.monotonic()


class MoveSource:
    """The moves that leave this host."""

    def __init__(self, vms: VmService, jobs: JobRegistry, peers: Connector) -> None:
        self.vms = vms
        self.jobs = jobs
        self.peers = peers
        self.config = vms.config
        self.observer: MoveObserver | None = None
        self.switch_guard: SwitchGuard | None = None
        self._slots = asyncio.Semaphore(self.config.max_live_migrations)
        self.arrival: dict[str, wire.IncomingOutcome] = {}  # move -> the destination's last word

    @property
    def host(self) -> str:
        return self.config.name

    def _movable(self, name: str, to: str) -> VmRecord:
        """The VM, if it may start moving to ``to`` now."""
        record = self.vms.get(name)
        if to == self.host:
            raise InvalidInputError(f"VM {name!r} already runs on host {to!r}")
        if record.state is not VmState.RUNNING:
            raise StateError(f"cannot move VM {name!r}: it is {record.state.value} "
                             "(live migration moves running VMs)")  # fmt: skip
        for job in self.jobs.all():
            if job.vm_uuid == record.uuid and job.kind == MOVE and not is_final(Phase(job.state)):
                raise ConflictError(f"VM {name!r} is already being moved (job {job.id})")
        return record

    async def preflight(self, name: str, *, to: str, to_url: str,
                        network_map: Mapping[str, str]) -> None:  # fmt: skip
        """Refuse, before any job exists, a move the destination could not take.

        The destination answers for its own networks (``CHECK``): every
        network the VM uses, under its mapped name, must exist there; and it
        must run the VM's CPU model (``core/cpu_models.cpu_refusal``). A VM
        without NICs, map or CPU model (an old catalog's ``max``) asks nothing,
        so its move costs what it did.
        """
        record = self._movable(name, to)
        if not record.spec.nics and not network_map and record.spec.cpu_model is None:
            return
        async with self.peers.connect(to, to_url) as peer:
            await peer.call(
                wire.CHECK, wire.CheckRequest(spec=record.spec, network_map=dict(network_map))
            )

    def start_move(
        self,
        name: str,
        *,
        to: str,
        to_url: str,
        storage: Storage,
        max_bandwidth: int | None,
        downtime_limit_ms: int | None,
        network_map: Mapping[str, str] | None = None,
        postcopy: bool = False,
    ) -> Job:
        record = self._movable(name, to)
        bandwidth = self.config.migration_max_bandwidth if max_bandwidth is None else max_bandwidth
        job = self.jobs.create(
            MOVE, record.uuid, record.name, Phase.QUEUED.value,
            target=to, target_url=to_url, storage=storage.value, phase=Phase.QUEUED.value,
            phase_started={Phase.QUEUED.value: time.time()},
            max_bandwidth=bandwidth, downtime_limit_ms=downtime_limit_ms,
            network_map=dict(network_map or {}), progress={}, result=None, error=None,
            postcopy=postcopy,
        )  # fmt: skip
        # Its log lines carry the VM, the job (the same id on the destination) and the peer.
        work = log_context.bound(self._run_move(job), vm=job.vm_name, vm_uuid=job.vm_uuid,
                                 job=job.id, kind=MOVE, peer=to)  # fmt: skip
        job.task = asyncio.create_task(work, name=f"move-{job.id}")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job.kind != MOVE:
            raise InvalidInputError(f"job {job_id} is the incoming side of a move; cancel it "
                                    "on the source host")  # fmt: skip
        phase = Phase(job.state)
        if is_final(phase):
            raise StateError(f"job {job_id} has already ended ({phase.value})")
        if not cancellable(phase):
            raise StateError(f"job {job_id} is {phase.value}: too late to cancel")
        # Once only: a second cancel (Ctrl-C, then 'job cancel') would cut
        # short the undo the first one started, leaving the destination's copy.
        if job.task is not None and not job.task.cancelling():
            job.task.cancel()
        return job

    # -- phases -----------------------------------------------------------------

    def phase(self, job: Job, phase: Phase, **detail: Any) -> None:
        """Enter ``phase`` (by the table of phases), noting when it began."""
        new = advance(Phase(job.state), phase)
        entered = dict(job.detail.get("phase_started") or {})
        entered[new.value] = time.time()
        self.jobs.update(job, new.value, phase=new.value, phase_started=entered, **detail)
        log.getChild(job.vm_name).info("move %s: %s", job.id, new.value)

    def end(self, job: Job, phase: Phase, *, error: str | None = None,
            result: dict[str, Any] | None = None) -> None:  # fmt: skip
        """Enter a final phase, unless the job has ended already."""
        if is_final(Phase(job.state)):
            return
        self.phase(job, phase, error=error, result=result)

    async def _run_move(self, job: Job) -> None:
        attempt = MoveAttempt(job, started=time.monotonic())
        try:
            waiting = self.jobs.turn_waiter(job)
            async with self._slots, self.vms.turns.turn(job.vm_uuid, "a move", waiting=waiting):
                self.phase(job, Phase.PREPARING)
                async with self.peers.connect(attempt.target, attempt.target_url) as peer:
                    await self._move(attempt, peer)
                    await self._moved(job, peer.thumbprint)
        except asyncio.CancelledError:
            if not attempt.finish_called:
                await self.undo(attempt, "cancelled by the admin")
            self.end(job, Phase.CANCELLED, error="cancelled; the VM runs on "
                     f"{self.host} as before")  # fmt: skip
            raise
        except FerryError as exc:
            if not attempt.finish_called:
                await self.undo(attempt, str(exc))
            self.end(job, Phase.FAILED, error=str(exc))
        except Exception as exc:
            log.exception("move %s failed unexpectedly", job.id)
            if not attempt.finish_called:
                await self.undo(attempt, str(exc))
            self.end(job, Phase.FAILED, error=f"internal error: {type(exc).__name__}: {exc}")

    async def _move(self, attempt: MoveAttempt, peer: PeerClient) -> None:
        """From ``preparing`` on: one step per phase, the source QEMU heard throughout."""
        job = attempt.job
        record, storage, launched = await self._prepare(attempt, peer)
        qemu = attempt.qemu = OutgoingMigration(self.vms.channel(record), tag=job.id,
                                                target=attempt.target)  # fmt: skip
        postcopy = bool(job.detail.get("postcopy"))
        await qemu.configure(tls_dir=self.config.tls_dir if launched.tls else None,
                             max_bandwidth=job.detail["max_bandwidth"],
                             downtime_limit_ms=job.detail.get("downtime_limit_ms"),
                             convergence=Convergence(postcopy=postcopy))  # fmt: skip
        marks = PauseMarks(offset=await measure_offset(peer, job.id))
        with qemu.listening(), run_state_events(qemu.channel) as run_state:
            if storage is Storage.COPY and record.spec.disks:
                sizes = [disk.size for disk in record.spec.disks]
                await self._copy_disks(job, qemu, peer, launched.nbd, sizes)
            await self._copy_memory(job, qemu, peer, launched.uri, marks)
            if (stopped := await run_state.last_stop()) is not None:
                marks.note(STOPPED, stopped)
            info, resume_ms = await self._switch_over(attempt, qemu, peer, record, storage,
                                                      marks)  # fmt: skip
        total_s = round(time.monotonic() - attempt.started, 3)
        entered = job.detail["phase_started"]
        disk_s = (entered[Phase.COPYING_MEMORY] - entered[Phase.COPYING_DISKS]
                  if Phase.COPYING_DISKS in entered else 0.0)  # fmt: skip
        memory_s = time.time() - entered[Phase.COPYING_MEMORY]
        copied = storage is Storage.COPY and bool(record.spec.disks)
        self.end(job, Phase.DONE, result={"result": "ok", "host": attempt.target,
                 "total_s": total_s, **marks.result(qemu_downtime_ms=info.downtime_ms,
                                                   postcopy_bytes=info.postcopy_bytes),
                 "resume_ms": resume_ms,
                 "storage": storage.value, "disk_copy_s": round(disk_s, 3),
                 "disk_bytes": (job.detail.get("progress") or {}).get("disk_bytes", 0)
                 if copied else 0, "memory_bytes": info.ram_transferred,
                 "memory_copy_s": round(memory_s, 3),
                 **(job.detail.get("result_extra") or {})})  # fmt: skip

    async def _prepare(
        self, attempt: MoveAttempt, peer: PeerClient
    ) -> tuple[VmRecord, Storage, wire.LaunchReply]:
        """``preparing``: the VM is migrating here; the destination waits for it."""
        job = attempt.job
        record = self.vms.get(job.vm_uuid)
        self.vms.apply(record, VmOp.MIGRATE)
        attempt.record = record
        # The VM arrives with each NIC on the destination's network for it (same MACs).
        spec = apply_network_map(record.spec, job.detail.get("network_map") or {})
        volumes = self.vms.catalog.volumes()
        locations = [locate_on_volume(disk.path, volumes) for disk in spec.disks]
        attempt.peer = peer  # from here on, a failure tells the destination to clean up
        prepared = await peer.call(wire.PREPARE, wire.PrepareRequest(
            job_id=job.id, spec=spec, storage=Storage(job.detail["storage"]),
            disk_volumes=locations, postcopy=bool(job.detail.get("postcopy")),
            into_volume=job.detail.get("into_volume")))  # fmt: skip
        storage = attempt.storage = prepared.storage
        self.jobs.update(job, storage=storage.value)
        await self._send_files(peer, job.id, spec)
        launched = await peer.call(wire.LAUNCH, id=job.id)
        if not launched.tls and not self.config.insecure_migration:
            raise MoveFailedError(
                f"host {peer.name!r} offers only plain TCP for the memory and disk streams; "
                "set insecure_migration on both hosts (trusted networks only) or on neither"
            )
        return record, storage, launched

    async def _copy_disks(self, job: Job, qemu: OutgoingMigration, peer: PeerClient,
                          nbd: wire.NbdEndpoint | None, sizes: list[int]) -> None:  # fmt: skip
        """``copying-disks``: mirror every disk into the destination's exports until ready."""
        self.phase(job, Phase.COPYING_DISKS)
        if nbd is None:
            raise MoveFailedError(f"host {peer.name!r} offers no NBD export for the disks")
        await qemu.mirror_disks(sizes, (nbd.host, nbd.port), speed=job.detail["max_bandwidth"])
        await qemu.wait_mirrors_ready(self._disk_progress(job), PeerWatch(peer, job.id).check)

    async def _copy_memory(
        self, job: Job, qemu: OutgoingMigration, peer: PeerClient, uri: str, marks: PauseMarks
    ) -> None:
        """``copying-memory``: stream the memory until QEMU pauses before switching over."""
        self.phase(job, Phase.COPYING_MEMORY)
        await qemu.migrate(uri)
        watch = PeerWatch(peer, job.id)
        if job.detail.get("postcopy"):
            marks.postcopy = await qemu.start_postcopy(self._memory_progress(job), watch.check)
        await qemu.wait_for(MigrationStatus.PRE_SWITCHOVER, self._memory_progress(job),
                            watch.check)  # fmt: skip
        marks.heard_paused = time.time()

    async def _switch_over(self, attempt: MoveAttempt, qemu: OutgoingMigration,
                           peer: PeerClient, record: VmRecord, storage: Storage,
                           marks: PauseMarks) -> tuple[MigrationInfo, int]:  # fmt: skip
        """``switching-over``: the last pages, then the destination resumes; never two copies.

        The point of no return: the source is paused with its last pages
        unsent. The mirrors complete side by side; then, unless a switch
        guard (a clustered VM's owner) must act between, the destination is
        asked to resume *before* the last pages go (``finish`` waits there
        until its side has loaded the stream, then ``cont``s at once), which
        saves a round trip of the pause. From that call on only the
        destination's word decides: the source lets go of the VM only once
        it says it runs it (and, in post-copy, once the last page went).
        Returns the stream's last state and how long after QEMU completed
        the guest ran again (ms, 0 if before).
        """
        job = attempt.job
        self.phase(job, Phase.SWITCHING_OVER)
        progress = self._memory_progress(job)

        def report(info: MigrationInfo) -> None:  # notes when the agent heard 'completed'
            progress(info)
            if info.status is MigrationStatus.COMPLETED and COMPLETED not in marks.local:
                marks.note(COMPLETED)

        if qemu.mirrors:
            await qemu.complete_mirrors()
            marks.note(MIRRORS_DONE)
        guard = self.switch_guard
        finishing: asyncio.Task[tuple[IncomingState, str | None]] | None = None
        if guard is None:
            attempt.finish_called = True
            finishing = asyncio.create_task(self.outcome(job, peer, finish=True))
        marks.note(CONTINUED)
        source_error: FerryError | None = None
        try:
            info = await qemu.continue_switch_over(report)
        except FerryError as exc:
            if finishing is None:
                raise
            source_error, info = exc, MigrationInfo(MigrationStatus.FAILED)
        completed = time.monotonic()
        if finishing is None:
            assert guard is not None
            await guard.before_switch(job.vm_uuid, attempt.target, job.id)  # undone if it fails
            attempt.finish_called = True
            outcome, why = await self.outcome(job, peer, finish=True)
        else:
            outcome, why = await finishing
        if outcome is not IncomingState.DONE:  # the destination does not run it: take it back
            if guard is not None and not await guard.after_switch(
                    job.vm_uuid, attempt.target, job.id, resumed=False):  # fmt: skip
                raise MoveFailedError(f"host {peer.name!r} could not resume the VM ({why}) and "
                                      "its ownership could not be taken back; it stays paused "
                                      f"on {self.host} so it never runs twice")  # fmt: skip
            await self.undo(attempt, f"destination could not resume: {why}")
            raise MoveFailedError(f"host {peer.name!r} could not resume the VM ({why}); it "
                                  f"runs on {self.host} again")  # fmt: skip
        marks.arrived(self.arrival.pop(job.id, wire.IncomingOutcome(state=outcome)))
        if source_error is not None and marks.postcopy:
            raise MoveFailedError(
                f"post-copy broke after the switch ({source_error}): VM "
                f"{job.vm_name!r} runs on {peer.name!r} without all of its "
                f"memory and is lost; its source QEMU stays on {self.host}"
            )
        if guard is not None:  # the destination runs it: the owner settles there
            await guard.after_switch(job.vm_uuid, attempt.target, job.id, resumed=True)
        attempt.resumed_at = time.monotonic()
        await self.vms.forget(record, keep_disks=storage is Storage.SHARED)
        # QEMU's downtime ends when the source sent its last page; the guest
        # runs again once the destination resumed, this much later.
        return info, max(0, round((attempt.resumed_at - completed) * 1000))

    async def _send_files(self, peer: PeerClient, job_id: str, spec: VmSpec) -> None:
        """The kernel and initrd a VM boots from travel ahead of it."""
        for name in KERNEL_FILES:
            path = getattr(spec, name)
            if path:
                data = await asyncio.to_thread(Path(path).read_bytes)
                await peer.call(wire.FILE, data=data, id=job_id, file=name)

    def _disk_progress(self, job: Job) -> Callable[[MirrorProgress], None]:
        def report(copied: MirrorProgress) -> None:
            self.jobs.update(job, progress={"disk_bytes": copied.done,
                                            "disk_total": copied.total})  # fmt: skip

        return report

    def _memory_progress(self, job: Job) -> Callable[[MigrationInfo], None]:
        def report(info: MigrationInfo) -> None:
            progress = dict(job.detail.get("progress") or {})
            progress.update({
                "status": info.status.value, "ram_bytes": info.ram_transferred,
                "ram_remaining": info.ram_remaining, "ram_total": info.ram_total,
                "mbps": info.mbps, "dirty_pages_rate": info.dirty_pages_rate,
                "expected_downtime_ms": info.expected_downtime_ms,
            })  # fmt: skip
            self.jobs.update(job, progress=progress)

        return report

    async def _moved(self, job: Job, thumbprint: str | None) -> None:
        """Tell the observer (replication) that the VM now runs on the target."""
        if self.observer is None or job.state != Phase.DONE:
            return
        try:
            await self.observer.hand_over(job.vm_uuid, job.detail["target"],
                                          job.detail["target_url"], thumbprint)  # fmt: skip
        except FerryError as exc:
            log.error("move %s: VM %s moved, but its replication was not handed over: %s",
                      job.id, job.vm_name, exc)  # fmt: skip

    # -- the destination's word, and undo --------------------------------------

    async def outcome(
        self, job: Job, peer: PeerClient, *, finish: bool
    ) -> tuple[IncomingState, str | None]:
        """Ask (and retry) until the destination says done or aborted, and why."""
        deadline = time.monotonic() + OUTCOME_WAIT_S
        while True:
            try:
                route = wire.FINISH if finish else wire.STATUS
                reply = await peer.call(route, id=job.id)
                if reply.state in (IncomingState.DONE, IncomingState.ABORTED):
                    self.arrival[job.id] = reply  # its marks, read by the switch-over
                    return reply.state, reply.error
            except ConnectionFailedError:
                finish = False  # we cannot know whether it resumed: ask, do not repeat
            except NotFoundError:
                return IncomingState.ABORTED, "the destination has no such move"
            except FerryError as exc:
                log.warning("move %s: destination says %s", job.id, exc)
                finish = False
            if time.monotonic() > deadline:
                raise MoveFailedError(
                    f"cannot learn whether host {peer.name!r} resumed VM {job.vm_name!r}; "
                    f"it stays paused on {self.host} so it never runs twice: check host "
                    f"{peer.name!r}, then 'ferry vm kill' the copy that must not run"
                )
            await asyncio.sleep(1)

    async def undo(self, attempt: MoveAttempt, reason: str) -> None:
        """Before switch-over: keep the VM running here, clean the destination."""
        record = attempt.record
        if record is None:
            return
        job = attempt.job
        log.getChild(record.name).warning("move %s undone: %s", job.id, reason)
        with contextlib.suppress(FerryError):
            qemu = attempt.qemu or OutgoingMigration(self.vms.channel(record), tag=job.id,
                                                     target=attempt.target)  # fmt: skip
            status = await qemu.undo()
            self.vms.apply(record, vmstate.confirmed(VmOp.MIGRATE_ABORTED, status))
        peer = attempt.peer
        if peer is not None:
            try:
                async with asyncio.timeout(ABORT_WAIT_S):
                    await peer.call(wire.ABORT, id=job.id)
            except (FerryError, TimeoutError) as exc:
                # It cleans itself when its agent is back (see recover()).
                log.warning("move %s: could not tell %s to clean up: %s", job.id, peer.name, exc)
