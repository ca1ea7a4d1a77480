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

from pydantic import BaseModel, ConfigDict, Field

from ferry.core.replication import (
    DEFAULT_FREQUENCY,
    DEFAULT_RECOVERY_POINTS,
    MAX_RECOVERY_POINTS,
    ReplicationState,
)


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
    # Replica side: where the chain lives.
    storage: str = ""
