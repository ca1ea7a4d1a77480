"""Moves keep replication: the relationship follows its VM to the host it moved to.

A live move of a replicated VM runs while the source holds the VM's disk
turn (no backup job races the migration); once it is done, the source hands
the relationship over (:func:`hand_over`):

1. pending points are sent to the replica (if that fails the new primary
   starts by resynchronising, since their files stay on the source); the
   dirty bitmap itself moved with the VM (``dirty-bitmaps``);
2. the replica is told its new primary (name, certificate thumbprint, URL),
   so the new primary's first cycle is welcome there;
3. the new host takes the relationship and its cycle history
   (``POST /v1/peer/replications``, :func:`adopt`), which it accepts only
   from the host its last finished incoming move of the VM came from;
4. the source forgets its side.

A handover cut short by an agent restart is redone from the finished move
job (:func:`after_restart`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import TYPE_CHECKING

from ferry.adapters.pki import CertInfo
from ferry.core import replication as rules
from ferry.core.migration import IncomingState, Phase
from ferry.core.relationship import Relationship, Role
from ferry.core.replication import ArrivedMove, ReplicationState
from ferry.core.vmstate import VmState
from ferry.errors import FerryError, InvalidInputError, NotFoundError
from ferry.host.jobs import JobRegistry
from ferry.host.migration.service import INCOMING, MOVE
from ferry.host.replication.receiver import caller_of
from ferry.peer.client import Timeout
from ferry.peer.replication import (
    HELLO,
    REPLICA,
    TAKE_OVER,
    UPDATE,
    PrimaryStatus,
    ReplicaChanges,
    Takeover,
)

if TYPE_CHECKING:
    from ferry.host.replication.primary import ReplicationService

log = logging.getLogger(__name__)

S = ReplicationState


async def hand_over(service: ReplicationService, vm_uuid: str, host: str, url: str,
                    thumbprint: str | None) -> None:  # fmt: skip
    """The VM now runs on ``host``: it becomes the primary, the replica is told.

    ``thumbprint``: ``host``'s certificate, if the move learnt it (else asked).
    Called while the VM's disk turn is held.
    """
    catalog = service.catalog
    rel = service.cycles.primary_rel(vm_uuid)
    if rel is None:
        return
    moved = (await send_pending(service, rel)).model_copy(update={"primary": host})
    async with service.peers.connect(host, url, timeout=Timeout.CONTROL) as target:
        if thumbprint is None:
            await target.call(HELLO)
            thumbprint = target.thumbprint or ""
        # The replica first, so the new primary's first cycle is welcome there.
        async with service.peer(rel) as peer:
            handed = ReplicaChanges(primary=host, thumbprint=thumbprint, primary_url=url)
            await peer.call(UPDATE, handed, uuid=vm_uuid)
        # The cycle history follows the VM, so status and measure carry on.
        takeover = Takeover(**moved.model_dump(), cycles=catalog.cycles(vm_uuid))
        await target.call(TAKE_OVER, takeover)
    catalog.delete_relationship(vm_uuid)
    catalog.replace_cycles(vm_uuid, [])  # the history lives on the new primary now
    await asyncio.to_thread(shutil.rmtree, service.work_dir / vm_uuid, True)
    service.scheduler.cancel(vm_uuid)
    log.info("VM %s: replication handed over to %s (pinned %s)", rel.vm_name, host,
             thumbprint[:16])  # fmt: skip


async def send_pending(service: ReplicationService, rel: Relationship) -> Relationship:
    """Send the relationship's pending points before it leaves this host; the
    relationship as the next primary takes it (no pending points, no cycle in
    flight; resynchronising if some could not be sent, as their files stay here)."""
    state = rel.state
    try:
        async with service.peer(rel) as peer:
            remote = await peer.call(REPLICA, uuid=rel.vm_uuid)
            rel = service.cycles.confirm(rel, remote.latest_point)
            for point in rel.pending:
                await service.cycles.send(peer, rel, point)
                rel = service.cycles.primary_rel(rel.vm_uuid) or rel
    except FerryError as exc:
        log.warning("VM %s: pending points not sent before the hand-over: %s",
                    rel.vm_name, exc)  # fmt: skip
        if rel.pending and state is S.REPLICATING:
            state = S.RESYNCHRONISING
    return rel.model_copy(update={"state": state, "pending": (), "in_flight": None})


def arrived_moves(jobs: JobRegistry) -> list[ArrivedMove]:
    """The live moves this host received and finished, from its ``incoming`` jobs."""
    return [ArrivedMove(j.vm_uuid, str(j.detail.get("source", "")), j.updated,
                        str(j.detail.get("source_thumbprint", "")))
            for j in jobs.all()
            if j.kind == INCOMING and j.state == IncomingState.DONE]  # fmt: skip


def adopt(service: ReplicationService, caller: CertInfo, takeover: Takeover) -> PrimaryStatus:
    """The VM arrived here by a move: carry on its replication as the primary.

    Only the host it arrived from may hand it over; a refusal changes nothing.
    """
    here = service.config.name
    rules.check_takeover(caller_of(caller), vm_uuid=takeover.vm_uuid, vm=takeover.vm_name,
                         here=here, arrived=arrived_moves(service.jobs))  # fmt: skip
    rel = Relationship.model_validate(takeover.model_dump(exclude={"cycles"}))
    record = service.catalog.find(rel.vm_uuid)
    if record is None or record.state is VmState.REPLICA or rel.role is not Role.PRIMARY:
        raise NotFoundError(f"VM {rel.vm_name!r} does not run on host {here!r}")
    if rel.primary != here:
        raise InvalidInputError(f"the relationship names {rel.primary!r} as primary, "
                                f"not {here!r}")  # fmt: skip
    service.catalog.put_relationship(rel)
    service.catalog.replace_cycles(rel.vm_uuid, list(takeover.cycles))
    service.scheduler.spawn(rel.vm_uuid)
    log.info("VM %s: replication to %s taken over from %s", rel.vm_name, rel.replica,
             caller.common_name)  # fmt: skip
    return PrimaryStatus.model_validate(service.status(rel.vm_name))


async def after_restart(service: ReplicationService, rel: Relationship) -> None:
    """The VM of ``rel`` left while the agent was down: redo the handover of its move."""
    moves = [j for j in service.jobs.all() if j.vm_uuid == rel.vm_uuid
             and j.kind == MOVE and j.state == Phase.DONE]  # fmt: skip
    if not moves:
        return
    target = moves[-1].detail
    try:
        await hand_over(service, rel.vm_uuid, target["target"], target["target_url"], None)
    except FerryError as exc:
        log.error("VM %s: cannot hand replication over to %s: %s", rel.vm_name,
                  target["target"], exc)  # fmt: skip
