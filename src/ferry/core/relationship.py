"""One replication relationship as both hosts record it (pure data, no I/O).

The primary and the replica each keep a :class:`Relationship` for the VM in
their catalogs; ``role`` says which side this copy is. The primary's copy
drives cycles: it pins the replica's server certificate thumbprint, counts
point ids and remembers *pending* points (deltas QEMU already cut from the
bitmap that the replica has not confirmed yet) and the *cycle in flight* (a
backup job QEMU may still be running when the agent dies). The replica's copy
pins the primary's client certificate and keeps the retention setting; its
recovery points live in the catalog's ``recovery_points`` table.

Why pending points: once a backup job succeeds QEMU clears the bitmap bits it
copied, so from then on the delta file is the only record of those changes.
The file is kept, and listed here, until the replica says it linked the
point; a failed send resends the same point with the same id, which the
replica accepts idempotently.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ferry.core.failover import FailoverState, state_of
from ferry.core.replication import (
    DEFAULT_FREQUENCY,
    DEFAULT_RECOVERY_POINTS,
    MAX_RECOVERY_POINTS,
    ClusterHost,
    ReplicationOp,
    ReplicationState,
    transition,
)

S = ReplicationState


class Role(StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"


class InitialMethod(StrEnum):
    NETWORK = "network"
    MEDIA = "media"
    EXISTING = "existing"


class PendingPoint(BaseModel):
    """A delta cut on the primary, not yet confirmed by the replica."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int
    time: float
    files: tuple[str, ...]  # absolute paths on the primary, one per disk
    resync: bool = False  # a hash-compare patch rather than a bitmap delta
    full: bool = False  # the initial full copy
    app_consistent: bool = False  # cut while the guest's file systems were frozen


class CycleInFlight(BaseModel):
    """Written before a backup transaction, cleared once its outcome is known.

    After an agent restart the QEMU job ``job_prefix`` + disk index tells
    whether the delta in ``files`` is whole (adopt it as pending), failed
    (QEMU merged the bitmap back: drop the files) or unknown (resynchronise).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int
    time: float
    tag: str
    files: tuple[str, ...]
    full: bool


class Relationship(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm_uuid: str
    vm_name: str
    role: Role
    state: ReplicationState = ReplicationState.INITIAL_COPY
    primary: str
    replica: str
    replica_url: str = ""
    frequency_s: int = int(DEFAULT_FREQUENCY)
    recovery_points: int = Field(default=DEFAULT_RECOVERY_POINTS, ge=0, le=MAX_RECOVERY_POINTS)
    compression: bool = True
    initial: InitialMethod = InitialMethod.NETWORK
    initial_after: float | None = None  # the initial copy waits until then
    # Primary: the replica's server certificate. Replica: the primary's client one.
    thumbprint: str = ""
    created: float = 0.0
    last_started: float | None = None
    next_point: int = 0
    confirmed_point: int | None = None  # newest point the replica linked
    pending: tuple[PendingPoint, ...] = ()
    in_flight: CycleInFlight | None = None
    error: str | None = None
    # The running state a pause or error interrupted: resume returns there, so a
    # half-done initial copy or resynchronisation is never mistaken for done.
    resume_to: ReplicationState | None = None
    # Replica side: where the chain lives, how to reach the primary, where a
    # failover stands (written only by ferry.core.failover.advance) and the
    # recovery points a test failover VM or a failed-over VM runs on (merges
    # that would touch them wait).
    storage: str = ""
    primary_url: str = ""
    failover: FailoverState = FailoverState.NONE
    test_vm: str | None = None
    test_point: int | None = None
    failover_point: int | None = None
    # An extended replica (its primary is itself a replica host): where the VM
    # itself runs, for the split-brain guard and for status.
    origin: str = ""
    origin_url: str = ""
    # Replica side, for a clustered VM: the primary's cluster and its hosts,
    # any of which may take the primary's place (core/replication/authority.py).
    cluster: str = ""
    cluster_hosts: tuple[ClusterHost, ...] = ()
    # Replica side of ``--replica cluster:C`` (the replica broker): C, whose store holds
    # this replica VM's record and owner (host/replication/broker.py).
    broker: str = ""
    # The VM's network -> the replica host's network its failovers use
    # (``--network-map``); the replica VM's spec already has it applied.
    network_map: dict[str, str] = Field(default_factory=dict)
    # Application-consistent points (``--app-consistent-every``): primary side,
    # how often the guest's file systems are frozen around a cut (None: never),
    # when that was last tried and how many tries failed or succeeded; replica
    # side, the ids of the points that were cut frozen.
    app_consistent_every_s: int | None = None
    last_freeze_attempt: float | None = None
    last_freeze_s: float | None = None  # how long the guest stayed frozen that time
    app_consistent_failures: int = 0
    app_consistent_successes: int = 0
    app_consistent_points: tuple[int, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """A document from before the failover state: derive it (``committed`` goes)."""
        if isinstance(data, dict) and "failover" not in data:
            data = {**data, "failover": state_of(data)}
            data.pop("committed", None)
        return data


# --------------------------------------------------------------------------- cycle decisions


def resume(rel: Relationship) -> Relationship:
    """Leave ``paused`` or ``error`` for the running state that was interrupted.

    A half-done initial copy or resynchronisation goes back to being one (it
    is never mistaken for done); anything else resumes replicating.
    """
    state = transition(rel.state, ReplicationOp.RESUME, vm=rel.vm_name)
    if rel.resume_to in (S.INITIAL_COPY, S.RESYNCHRONISING):
        state = rel.resume_to
    return rel.model_copy(update={"state": state, "error": None, "resume_to": None})


def resumed_by_new_owner(rel: Relationship, *, node: str) -> Relationship:
    """A clustered VM restarted on ``node`` after its owner was lost: the new primary's record.

    ``rel`` is the relationship its old owner last published. What only the
    lost node had goes: its pending points and a cycle in flight (their
    files were on that node), and with them any trust in the dirty bitmap (a
    SIGKILLed QEMU leaves it inconsistent). So a running relationship
    resynchronises by block hashes, an initial copy starts again, and a
    paused or stopped one resynchronises once resumed. Point ids carry on
    past the last one the replica confirmed; frequency, retention and the
    replica's pinned certificate stay.
    """
    if rel.role is not Role.PRIMARY:
        raise ValueError("only a primary's relationship can follow its VM")
    state, resume_to = rel.state, rel.resume_to
    if state in (S.REPLICATING, S.RESYNCHRONISING):
        state = transition(state, ReplicationOp.BITMAP_LOST, vm=rel.vm_name)
    elif state in (S.PAUSED, S.ERROR) and resume_to is not S.INITIAL_COPY:
        resume_to = S.RESYNCHRONISING
    confirmed = rel.confirmed_point if rel.confirmed_point is not None else -1
    return rel.model_copy(update={
        "primary": node, "state": state, "resume_to": resume_to, "pending": (),
        "in_flight": None, "next_point": max(rel.next_point, confirmed + 1)})  # fmt: skip


def handed_to_new_owner(rel: Relationship, *, node: str) -> Relationship:
    """A clustered VM its old cluster handed over cleanly (``cluster copy-roles --run``).

    ``rel`` is what the old owner wrote for the new cluster after it stopped
    the VM cleanly (the dirty bitmap saved in the qcow2) and sent its pending
    points: nothing lives only on the old node, so, unlike
    :func:`resumed_by_new_owner`, the state stays as it was and the next cycle
    is a delta of the bitmap, not a resynchronisation.
    """
    if rel.role is not Role.PRIMARY:
        raise ValueError("only a primary's relationship can follow its VM")
    if rel.pending or rel.in_flight is not None:
        return resumed_by_new_owner(rel, node=node)  # their files stayed behind
    return rel.model_copy(update={"primary": node})


class CycleMode(StrEnum):
    """What a cycle cuts after the pending points went."""

    WAIT = "wait"  # the initial copy travels on media; the replica has not linked it
    FULL = "full"  # the initial copy over the network
    RESYNC = "resync"  # block hashes compared, only differing blocks
    DELTA = "delta"  # what the dirty bitmap recorded


def cycle_mode(rel: Relationship, *, bitmap_usable: bool,
               now: float = 0.0) -> tuple[CycleMode, Relationship]:  # fmt: skip
    """The kind of point to cut now, and the relationship as it then stands.

    An initial copy counts as done once the replica linked a point with an id
    of 0 or more (the image adopted by ``--initial existing`` is linked as -1
    and is only the base to compare against). An initial copy scheduled for
    later (``initial_after``) waits until ``now`` reaches it. A bitmap that is
    not usable while replicating turns the relationship to resynchronising.
    """
    state = rel.state
    if state is S.INITIAL_COPY and rel.confirmed_point is not None and rel.confirmed_point >= 0:
        state = transition(state, ReplicationOp.INITIAL_COPY_DONE, vm=rel.vm_name)
    if state is S.INITIAL_COPY and rel.initial_after is not None and now < rel.initial_after:
        mode = CycleMode.WAIT
    elif state is S.INITIAL_COPY:
        mode = {InitialMethod.NETWORK: CycleMode.FULL, InitialMethod.MEDIA: CycleMode.WAIT,
                InitialMethod.EXISTING: CycleMode.RESYNC}[rel.initial]  # fmt: skip
    elif state is S.RESYNCHRONISING:
        mode = CycleMode.RESYNC
    elif not bitmap_usable:
        state = transition(state, ReplicationOp.BITMAP_LOST, vm=rel.vm_name)
        mode = CycleMode.RESYNC
    else:
        mode = CycleMode.DELTA
    return mode, rel.model_copy(update={"state": state})


class Verdict(StrEnum):
    """What QEMU says became of a backup the agent lost track of."""

    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"


def settle_in_flight(rel: Relationship, verdict: Verdict) -> tuple[Relationship, bool]:
    """The relationship after an interrupted backup, and whether its files are kept.

    A finished delta becomes a pending point. A full copy is kept only as the
    initial point sent over the network; one cut for a resynchronisation or
    for media is redone from the start. A failed backup left its changes in
    the bitmap (QEMU merged it back). When nobody can tell (QEMU restarted or
    the jobs were gone), a replicating relationship must resynchronise.
    """
    flight = rel.in_flight
    if flight is None:
        return rel, False
    update: dict[str, object] = {"in_flight": None}
    usable = not flight.full or (rel.state is S.INITIAL_COPY
                                 and rel.initial is InitialMethod.NETWORK)  # fmt: skip
    keep = verdict is Verdict.OK and usable
    if keep:
        point = PendingPoint(id=flight.id, time=flight.time, files=flight.files, full=flight.full)
        update["pending"] = (*rel.pending, point)
    elif verdict is Verdict.UNKNOWN and rel.state is S.REPLICATING:
        update["state"] = transition(rel.state, ReplicationOp.BITMAP_LOST, vm=rel.vm_name)
    return rel.model_copy(update=update), keep


# --------------------------------------------------------------------------- extended replication


class Extension(BaseModel):
    """A replica host replicating its recovery points onward to a third host.

    Kept on the replica host (the extension's sender) next to its replica
    relationship, in a record of its own so the two never overwrite each
    other. The extended host keeps an ordinary replica relationship whose
    primary is the replica host and whose ``origin`` is the VM's primary.

    A cycle sends the changes between the extended host's latest point
    (``confirmed_point``) and the replica's latest as one overlay, so the
    replica's own retention must leave every point newer than that alone
    (:func:`extension_pin`). ``sending_point`` is the point a cycle cut and
    has not seen confirmed; it pins the chain before the first confirmation.
    """

    model_config = ConfigDict(extra="forbid")

    vm_uuid: str
    vm_name: str
    host: str
    url: str
    frequency_s: int
    recovery_points: int = Field(default=DEFAULT_RECOVERY_POINTS, ge=0, le=MAX_RECOVERY_POINTS)
    thumbprint: str = ""
    state: ReplicationState = ReplicationState.INITIAL_COPY
    created: float = 0.0
    last_started: float | None = None
    confirmed_point: int | None = None
    sending_point: int | None = None
    error: str | None = None


def extension_pin(ext: Extension | None) -> int | None:
    """Points with a larger id than this must stay separate files on the replica."""
    if ext is None:
        return None
    if ext.confirmed_point is not None:
        return ext.confirmed_point
    return ext.sending_point


def extension_confirmed(ext: Extension, latest: int | None) -> Extension:
    """The extended host reports its latest point: the initial copy may be done."""
    if latest is None or latest < 0:
        return ext
    state = ext.state
    if state is S.INITIAL_COPY:
        state = transition(state, ReplicationOp.INITIAL_COPY_DONE, vm=ext.vm_name)
    sending = ext.sending_point
    if sending is not None and sending <= latest:
        sending = None
    return ext.model_copy(update={"confirmed_point": latest, "state": state,
                                  "sending_point": sending})  # fmt: skip
