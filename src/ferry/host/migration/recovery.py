"""After an agent restart: finish or undo every move that was under way.

A move's job row is written before each phase, so a restarted agent knows
where each move stood; QEMU, which kept running, says the rest. On the
destination, a VM found running arrived (it resumed just before the agent
stopped); anything else is aborted. On the source, a stream QEMU reports
``completed`` may have arrived: only the destination's word that it runs the
VM ends the move as done, otherwise the move is undone and the VM runs here.

The destination resumes a VM only when the source tells it to (``finish``),
so a destination still ``receiving`` has not resumed and will not: it is
called off at once (its abort waits for a ``finish`` already under way, and
answers ``done`` if that won) rather than asked again for a minute while the
restarted agent does not serve. A destination that cannot be reached may run
the VM: it stays paused here, so it never runs twice. A move into another
cluster whose hand-over was written (``handover_revision`` in its job) belongs
to that cluster: it is finished there (``finish`` if still ``receiving``) and
never undone here; so is a move within a cluster whose pending owner was
written.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from ferry.adapters.catalog import VmRecord
from ferry.adapters.migration import MigrationStatus, OutgoingMigration
from ferry.core.migration import IncomingState, Phase, Storage, is_final
from ferry.core.vmstate import QemuStatus
from ferry.errors import ConnectionFailedError, FerryError, NotFoundError
from ferry.host.jobs import Job
from ferry.host.migration.attempt import INCOMING, MOVE, MoveAttempt
from ferry.host.migration.destination import MoveDestination
from ferry.host.migration.source import ABORT_WAIT_S, MoveSource
from ferry.peer import migration as wire
from ferry.peer.client import PeerClient, Timeout

RESTARTED = "the agent restarted during the move"
REACH_S = 15.0  # how long a restarted source tries to reach the destination


async def recover(source: MoveSource, destination: MoveDestination) -> None:
    """Finish or undo every move that was under way when the agent stopped."""
    for job in source.jobs.all():
        if job.kind == INCOMING and job.state == IncomingState.RECEIVING:
            await _recover_incoming(destination, job)
        elif job.kind == MOVE and not is_final(Phase(job.state)):
            await _recover_move(source, job)


async def _recover_incoming(destination: MoveDestination, job: Job) -> None:
    record = destination.vms.catalog.find(job.vm_uuid)
    status: QemuStatus | None = None
    if record is not None:
        with contextlib.suppress(FerryError):
            status = await destination.vms.channel(record).status()
    if status is QemuStatus.RUNNING:  # resumed just before the agent stopped
        destination.resumed(job)
    else:
        await destination.abort_incoming(job, RESTARTED)


async def _recover_move(source: MoveSource, job: Job) -> None:
    vms = source.vms
    record = vms.catalog.find(job.vm_uuid)
    if record is None:  # the VM was let go of: it resumed there
        source.end(job, Phase.DONE if job.state == Phase.SWITCHING_OVER else Phase.FAILED)
        return
    if job.detail.get("handover_revision"):
        await _recover_handed_over(source, job, record)
        return
    attempt = MoveAttempt(job, started=time.monotonic(), record=record)
    status: MigrationStatus | None = None
    try:
        attempt.qemu = OutgoingMigration(vms.channel(record), tag=job.id, target=attempt.target)
        status = await attempt.qemu.rediscover(len(record.spec.disks))
    except FerryError:
        status = None
    async with source.peers.connect(attempt.target, attempt.target_url,
                                    timeout=Timeout.PROBE) as peer:  # fmt: skip
        attempt.peer = peer
        if status is MigrationStatus.COMPLETED:
            try:
                outcome = await _destination_fate(job, peer)
            except FerryError as exc:  # it may run there: never run it twice
                source.end(job, Phase.FAILED, error=(
                    f"{RESTARTED}: cannot learn whether host {attempt.target!r} resumed VM "
                    f"{job.vm_name!r} ({exc}); it stays paused on {source.host} so it never "
                    f"runs twice: check host {attempt.target!r}, then 'ferry vm kill' the "
                    "copy that must not run"))  # fmt: skip
                return
            if outcome is IncomingState.DONE:
                storage = Storage(job.detail["storage"])
                await vms.forget(record, keep_disks=storage is Storage.SHARED)
                source.end(job, Phase.DONE, result={"result": "ok", "host": attempt.target})
                return
        await source.undo(attempt, RESTARTED)
    if Phase(job.state) is Phase.SWITCHING_OVER:
        source.end(job, Phase.FAILED, error="the agent restarted during the switch-over; "
                   f"the VM stays on {source.host}")  # fmt: skip
    else:
        source.end(job, Phase.FAILED, error=f"{RESTARTED}; the VM stays on {source.host}")


async def _recover_handed_over(source: MoveSource, job: Job, record: VmRecord) -> None:
    """A clustered VM's move whose hand-over was written: the store gives the VM to the
    destination (the stream was complete), so it is finished there, never resumed here
    (a pending owner the reconcilers settle; another cluster's owner is final)."""
    target, url = job.detail["target"], job.detail["target_url"]
    cluster = job.detail.get("to_cluster")
    owner = (
        f"cluster {cluster} owns it"
        if cluster
        else f"host {job.detail['target']} owns it in the cluster"
    ) + f" since revision {job.detail['handover_revision']}"
    try:
        async with source.peers.connect(target, url, timeout=Timeout.TRANSFER) as peer:
            reply = await peer.call(wire.STATUS, id=job.id)
            if reply.state is IncomingState.RECEIVING:  # the finish never came: now
                reply = await peer.call(wire.FINISH, id=job.id)
        state: IncomingState | str = reply.state
    except FerryError as exc:
        state = str(exc)
    if state is IncomingState.DONE:
        storage = Storage(job.detail["storage"])
        await source.vms.forget(record, keep_disks=storage is Storage.SHARED)
        source.end(job, Phase.DONE, result={"result": "ok", "host": target})
        return
    source.end(job, Phase.FAILED, error=(
        f"{RESTARTED} after the hand-over: {owner}, and host {target!r} did not resume it "
        f"({state}); it stays stopped on {source.host}, never run here again"))  # fmt: skip


async def _destination_fate(job: Job, peer: PeerClient) -> IncomingState:
    """Done if the destination runs the VM; else it is called off (and says aborted).

    Retries for :data:`REACH_S` while the destination cannot be reached (its
    agent may be restarting too), then raises.
    """
    deadline = time.monotonic() + REACH_S
    while True:
        try:
            reply = await peer.call(wire.STATUS, id=job.id)
            if reply.state is IncomingState.RECEIVING:  # not resumed, and never will be
                async with asyncio.timeout(ABORT_WAIT_S):
                    reply = await peer.call(wire.ABORT, id=job.id)
            return reply.state
        except NotFoundError:
            return IncomingState.ABORTED
        except ConnectionFailedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)
