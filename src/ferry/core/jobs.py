"""The life cycle of a job run by the job runner, as a pure state machine.

Theory of operation: a job (an export, an import, a failover step, a
replication copy) is created ``running`` and ends exactly once, in ``done``,
``failed`` or ``cancelled``; a final state is never left. An admin's cancel
either ends the job at once (its task is cancelled: an export) or asks it to
stop (``cancelling``) at its next safe point, where the job's undo runs and
the job ends ``cancelled`` (or ``failed`` when the undo failed, or ``done``
when the work ended before it reached a safe point)::

    running --cancel--> cancelling
    running | cancelling --finish--> done
    running | cancelling --fail--> failed       (also: interrupted by a restart)
    running | cancelling --stop--> cancelled

A move and the incoming side of a move are jobs too, but their states are
their phases, with their own table in :mod:`ferry.core.migration`; the job
registry stores those as their owner decides. No I/O here.
"""

from __future__ import annotations

from enum import StrEnum

from ferry.core import transitions
from ferry.errors import StateError


class JobState(StrEnum):
    RUNNING = "running"
    CANCELLING = "cancelling"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobOp(StrEnum):
    CANCEL = "cancel"  # asked to stop at its next safe point
    FINISH = "finish"
    FAIL = "fail"
    STOP = "stop"  # ended cancelled


S = JobState
_LIVE = frozenset({S.RUNNING, S.CANCELLING})
FINAL = frozenset({S.DONE, S.FAILED, S.CANCELLED})

# operation -> (states it is allowed in, state it leads to)
TRANSITIONS: dict[JobOp, tuple[frozenset[JobState], JobState]] = {
    JobOp.CANCEL: (frozenset({S.RUNNING}), S.CANCELLING),
    JobOp.FINISH: (_LIVE, S.DONE),
    JobOp.FAIL: (_LIVE, S.FAILED),
    JobOp.STOP: (_LIVE, S.CANCELLED),
}

# Each state is reached by one operation, so "go to state X" names its operation.
_REACHED_BY: dict[JobState, JobOp] = {target: op for op, (_, target) in TRANSITIONS.items()}
assert len(_REACHED_BY) == len(TRANSITIONS)


def apply(state: JobState, op: JobOp, *, job: str = "") -> JobState:
    """The state ``op`` leads to from ``state``, or StateError naming both."""
    return transitions.apply(TRANSITIONS, state, op, subject=f"job {job}" if job else "the job")


def advance(state: JobState, target: str, *, job: str = "") -> JobState:
    """Go from ``state`` to ``target`` by the one operation that leads there, or StateError."""
    try:
        op = _REACHED_BY[JobState(target)]
    except (ValueError, KeyError):
        who = f"job {job}" if job else "a job"
        raise StateError(f"{who} cannot go from {state.value} to {target}: no operation "
                         "leads there", subject=who, state=state) from None  # fmt: skip
    return apply(state, op, job=job)


def is_final(state: JobState) -> bool:
    return state in FINAL
