"""The life cycle of a replication relationship: its states and the transition table.

A relationship is born ``initial-copy`` and is always in one
:class:`ReplicationState`. Admin requests and things the agent observes are
operations (:class:`ReplicationOp`); :data:`TRANSITIONS` says from which states
each one is allowed and where it leads, and :func:`transition` is the only way
a state changes::

    initial-copy --initial-copy-done--> replicating
    replicating | resynchronising --bitmap-lost--> resynchronising
    resynchronising --resync-done--> replicating
    initial-copy | replicating | resynchronising --fail--> error
    initial-copy | replicating | resynchronising | error --pause--> paused
    paused | error --resume--> replicating
    replicating | resynchronising | paused | error --failover--> failed-over
    failed-over --cancel-failover--> replicating (the failed-over VM is gone)
    failed-over --reverse--> initial-copy (the other way round)
    anything but removed --remove--> removed

A cycle that fails (network down, replica busy) does not change the state: its
bitmap keeps every change and the next cycle resends. Only a failure that a
retry cannot cure (certificate thumbprint mismatch, version refusal, replica
VM moved away, primary not authorised) is ``fail`` -> ``error``; ``set``
(new thumbprint or replica host) or ``resume`` leaves it. ``resume`` always
leads to ``replicating``: the first cycle after it checks that the dirty
bitmap still covers every change since the replica's latest point (the bitmap
is consistent and was started with that point) and otherwise reports
``bitmap-lost``, which resynchronises. This also covers a pause during the
initial copy or a resynchronisation: a half-made copy is only a replica whose
blocks differ, which is what resynchronising repairs.
"""

from __future__ import annotations

from enum import StrEnum

from ferry.core import transitions


class ReplicationState(StrEnum):
    INITIAL_COPY = "initial-copy"
    REPLICATING = "replicating"
    RESYNCHRONISING = "resynchronising"
    PAUSED = "paused"
    ERROR = "error"
    FAILED_OVER = "failed-over"
    REMOVED = "removed"


class ReplicationOp(StrEnum):
    INITIAL_COPY_DONE = "initial-copy-done"
    BITMAP_LOST = "bitmap-lost"
    RESYNC_DONE = "resync-done"
    PAUSE = "pause"
    RESUME = "resume"
    FAIL = "fail"
    FAILOVER = "failover"
    CANCEL_FAILOVER = "cancel-failover"
    REVERSE = "reverse"
    REMOVE = "remove"


S = ReplicationState
INITIAL_STATE = S.INITIAL_COPY
# States in which cycles (or the initial copy) run on their own.
_RUNNING = frozenset({S.INITIAL_COPY, S.REPLICATING, S.RESYNCHRONISING})

# operation -> (states it is allowed in, state it leads to)
TRANSITIONS: dict[ReplicationOp, tuple[frozenset[ReplicationState], ReplicationState]] = {
    ReplicationOp.INITIAL_COPY_DONE: (frozenset({S.INITIAL_COPY}), S.REPLICATING),
    # Lost again during a resync: start the resync over.
    ReplicationOp.BITMAP_LOST: (frozenset({S.REPLICATING, S.RESYNCHRONISING}), S.RESYNCHRONISING),
    ReplicationOp.RESYNC_DONE: (frozenset({S.RESYNCHRONISING}), S.REPLICATING),
    ReplicationOp.PAUSE: (_RUNNING | {S.ERROR}, S.PAUSED),
    ReplicationOp.RESUME: (frozenset({S.PAUSED, S.ERROR}), S.REPLICATING),
    ReplicationOp.FAIL: (_RUNNING, S.ERROR),
    # Not from initial-copy: there is no recovery point yet. A relationship
    # paused during its initial copy has none either; the failover service
    # checks the catalog for a point, the table cannot know.
    ReplicationOp.FAILOVER: (
        frozenset({S.REPLICATING, S.RESYNCHRONISING, S.PAUSED, S.ERROR}),
        S.FAILED_OVER,
    ),
    # The replica goes back to being one: the failed-over VM is gone.
    ReplicationOp.CANCEL_FAILOVER: (frozenset({S.FAILED_OVER}), S.REPLICATING),
    # The old primary becomes the replica; its disks serve as the initial copy.
    ReplicationOp.REVERSE: (frozenset({S.FAILED_OVER}), S.INITIAL_COPY),
    ReplicationOp.REMOVE: (frozenset(S) - {S.REMOVED}, S.REMOVED),
}


def is_running(state: ReplicationState) -> bool:
    """True while the scheduler should start cycles for the relationship."""
    return state in _RUNNING


def allowed(state: ReplicationState, op: ReplicationOp) -> bool:
    return state in TRANSITIONS[op][0]


def transition(state: ReplicationState, op: ReplicationOp, *, vm: str = "") -> ReplicationState:
    """Return the state ``op`` leads to from ``state``, or raise StateError."""
    who = f"VM {vm!r}" if vm else "the VM"
    return transitions.apply(TRANSITIONS, state, op, subject=f"replication of {who}")
