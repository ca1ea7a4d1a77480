"""Failover as a pure state machine: where a replica VM's failover stands, and its jobs' phases.

Theory of operation. A replica host keeps one :class:`FailoverState` per
replica relationship (``Relationship.failover``); it is the only record of
whether a test VM or the replica VM itself runs from a recovery point. The
admin's failover commands are operations (:class:`FailoverOp`) and
:data:`TRANSITIONS` says from which states each is allowed and where it
leads::

    none --test--> testing --stop-test--> none
    none --start--> failed-over --cancel--> none
    failed-over | completed --complete--> completed
    failed-over | completed --reverse--> none

``start`` is also how a planned failover ends on the replica. ``reverse``
makes a failover final first (``complete``) and then replaces the
relationship by one the other way round, which begins with no failover. A
test failover is refused while the VM failed over (the drill would boot a
point that ``complete`` may delete), and a failover while a test runs.

:func:`advance` is the one writer: it applies the table, applies the
replication life cycle's operation that goes with it (``start`` is the
relationship's ``failover``, ``cancel`` its ``cancel-failover``) and sets
the fields that say *which* point and test VM (``test_point``, ``test_vm``,
``failover_point``), so no caller writes those four things on its own. A
refusal is a :class:`~ferry.errors.StateError` naming both states, with the
remedy where one is known (:data:`REFUSALS`).

Every failover operation runs as a job of kind ``failover-<action>``
(:class:`FailoverJob`) that walks the phases of :data:`PHASES` in order; the
job runner writes the final one (``done``, ``failed``, ``cancelled``). Each
phase begins with its decision already in the catalog, which is what makes
a crash, or a cancel honoured when the next phase begins, leave a state that
``recover`` or the job's undo can finish. Nothing here does I/O.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

from ferry.core import transitions
from ferry.core.replication import ReplicationOp
from ferry.core.replication import transition as replication_transition
from ferry.errors import StateError

if TYPE_CHECKING:
    from ferry.core.relationship import Relationship


class FailoverState(StrEnum):
    NONE = "none"  # a replica: nothing runs from its recovery points
    TESTING = "testing"  # <VM>-test runs on overlays over test_point; replication goes on
    FAILED_OVER = "failed-over"  # the replica VM runs on overlays over failover_point
    COMPLETED = "completed"  # failed over for good: the other recovery points are gone


class FailoverOp(StrEnum):
    TEST = "test"
    STOP_TEST = "stop-test"
    START = "start"
    COMPLETE = "complete"
    CANCEL = "cancel"
    REVERSE = "reverse"


F = FailoverState

# operation -> (states it is allowed in, state it leads to)
TRANSITIONS: dict[FailoverOp, tuple[frozenset[FailoverState], FailoverState]] = {
    FailoverOp.TEST: (frozenset({F.NONE}), F.TESTING),
    FailoverOp.STOP_TEST: (frozenset({F.TESTING}), F.NONE),
    FailoverOp.START: (frozenset({F.NONE}), F.FAILED_OVER),
    # Again on a completed failover: nothing more to drop (reverse relies on it).
    FailoverOp.COMPLETE: (frozenset({F.FAILED_OVER, F.COMPLETED}), F.COMPLETED),
    FailoverOp.CANCEL: (frozenset({F.FAILED_OVER}), F.NONE),
    FailoverOp.REVERSE: (frozenset({F.FAILED_OVER, F.COMPLETED}), F.NONE),
}

# The replication life cycle moves with these operations.
_REPLICATION: dict[FailoverOp, ReplicationOp] = {
    FailoverOp.START: ReplicationOp.FAILOVER,
    FailoverOp.CANCEL: ReplicationOp.CANCEL_FAILOVER,
}

# What an operation sets or clears besides the state; "point" and "test_vm"
# are the caller's arguments.
_FIELDS: dict[FailoverOp, dict[str, str | None]] = {
    FailoverOp.TEST: {"test_point": "point", "test_vm": "test_vm"},
    FailoverOp.STOP_TEST: {"test_point": None, "test_vm": None},
    FailoverOp.START: {"failover_point": "point"},
    FailoverOp.COMPLETE: {},
    FailoverOp.CANCEL: {"failover_point": None},
    FailoverOp.REVERSE: {},
}

# A refusal with its remedy, by (operation, state); {vm} and {host} are filled in.
REFUSALS: dict[tuple[FailoverOp, FailoverState], str] = {
    (FailoverOp.TEST, F.TESTING): (
        "a test failover of VM {vm!r} runs already; 'ferry failover stop-test {vm}' ends it"
    ),
    (FailoverOp.TEST, F.FAILED_OVER): (
        "VM {vm!r} failed over on host {host!r}; a test failover is a drill for a VM that "
        "still runs on its primary (cancel or complete the failover first)"
    ),
    (FailoverOp.TEST, F.COMPLETED): (
        "VM {vm!r} failed over on host {host!r} for good; there is nothing to drill"
    ),
    (FailoverOp.STOP_TEST, F.NONE): "no test failover of VM {vm!r} runs on host {host!r}",
    (FailoverOp.STOP_TEST, F.FAILED_OVER): "no test failover of VM {vm!r} runs on host {host!r}",
    (FailoverOp.STOP_TEST, F.COMPLETED): "no test failover of VM {vm!r} runs on host {host!r}",
    (FailoverOp.START, F.TESTING): (
        "a test failover of VM {vm!r} runs; stop it first ('ferry failover stop-test {vm}')"
    ),
    (FailoverOp.START, F.FAILED_OVER): "VM {vm!r} failed over on host {host!r} already",
    (FailoverOp.START, F.COMPLETED): "VM {vm!r} failed over on host {host!r} already",
    (FailoverOp.COMPLETE, F.NONE): "VM {vm!r} is not failed over on host {host!r}",
    (FailoverOp.COMPLETE, F.TESTING): (
        "VM {vm!r} is not failed over on host {host!r} (a test failover runs)"
    ),
    (FailoverOp.CANCEL, F.NONE): "VM {vm!r} is not failed over on host {host!r}",
    (FailoverOp.CANCEL, F.TESTING): (
        "VM {vm!r} is not failed over on host {host!r}; a test failover ends with "
        "'ferry failover stop-test {vm}'"
    ),
    (FailoverOp.CANCEL, F.COMPLETED): (
        "the failover of VM {vm!r} was completed; it cannot be cancelled any more"
    ),
    (FailoverOp.REVERSE, F.NONE): "VM {vm!r} is not failed over here; nothing to reverse",
    (FailoverOp.REVERSE, F.TESTING): "VM {vm!r} is not failed over here; nothing to reverse",
}


def apply(state: FailoverState, op: FailoverOp, *, vm: str = "", host: str = "") -> FailoverState:
    """The state ``op`` leads to from ``state``, or StateError naming both (and the remedy)."""
    try:
        return transitions.apply(TRANSITIONS, state, op, subject=_subject(vm))
    except StateError as exc:
        why = REFUSALS.get((op, state))
        if why is None:
            raise
        raise StateError(why.format(vm=vm, host=host), subject=exc.subject, op=op,
                         state=state, required=exc.required) from None  # fmt: skip


def check(rel: Relationship, op: FailoverOp, *, host: str = "") -> None:
    """Refuse ``op`` now, before any work, if :func:`advance` would refuse it later."""
    apply(rel.failover, op, vm=rel.vm_name, host=host)
    if op in _REPLICATION:
        replication_transition(rel.state, _REPLICATION[op], vm=rel.vm_name)


def advance(rel: Relationship, op: FailoverOp, *, host: str = "", point: int | None = None,
            test_vm: str | None = None) -> Relationship:  # fmt: skip
    """``rel`` after ``op``: failover state, replication state and point fields together."""
    state = apply(rel.failover, op, vm=rel.vm_name, host=host)
    arguments = {"point": point, "test_vm": test_vm}
    update: dict[str, Any] = {"failover": state}
    for field, source in _FIELDS[op].items():
        value = None if source is None else arguments[source]
        if source is not None and value is None:
            raise ValueError(f"failover {op.value} needs {source}")
        update[field] = value
    if op in _REPLICATION:
        update["state"] = replication_transition(rel.state, _REPLICATION[op], vm=rel.vm_name)
    return rel.model_copy(update=update)


def state_of(document: dict[str, Any]) -> FailoverState:
    """The failover state of a relationship document written before it had one.

    Those kept ``test_vm``, the replication state ``failed-over`` and a
    ``committed`` flag instead; a test that ran during a failover counts as
    the failover (its VM can still be deleted by hand).
    """
    if document.get("state") == "failed-over":
        return F.COMPLETED if document.get("committed") else F.FAILED_OVER
    if document.get("test_vm"):
        return F.TESTING
    return F.NONE


def _subject(vm: str) -> str:
    return f"the failover of VM {vm!r}" if vm else "the failover"


# --------------------------------------------------------------------------- jobs and phases


class FailoverJob(StrEnum):
    """The job kinds of failover operations (``ferry job list`` shows these)."""

    TEST = "failover-test"
    STOP_TEST = "failover-stop-test"
    START = "failover-start"
    COMPLETE = "failover-complete"
    CANCEL = "failover-cancel"
    PLANNED = "failover-planned"  # on the primary; the replica then starts and reverses
    REVERSE = "failover-reverse"


class Phase(StrEnum):
    STARTING = "starting"
    CHECKING = "checking"
    CHECKING_PRIMARY = "checking-primary"
    CREATING_OVERLAYS = "creating-overlays"
    STARTING_VM = "starting-vm"
    DELETING_VM = "deleting-vm"
    MERGING = "merging"
    DROPPING_POINTS = "dropping-points"
    STOPPING_VM = "stopping-vm"
    RESTORING_REPLICA = "restoring-replica"
    SHUTTING_DOWN = "shutting-down"
    FINAL_CYCLE = "final-cycle"
    STARTING_ON_REPLICA = "starting-on-replica"
    ASKING_OLD_PRIMARY = "asking-old-primary"
    ENABLING = "enabling"


P = Phase

# job -> its phases in order; a job is created in the first.
PHASES: dict[FailoverJob, tuple[Phase, ...]] = {
    FailoverJob.TEST: (P.STARTING, P.CREATING_OVERLAYS, P.STARTING_VM),
    FailoverJob.STOP_TEST: (P.STARTING, P.DELETING_VM, P.MERGING),
    FailoverJob.START: (P.STARTING, P.CHECKING_PRIMARY, P.CREATING_OVERLAYS, P.STARTING_VM),
    FailoverJob.COMPLETE: (P.STARTING, P.DROPPING_POINTS),
    FailoverJob.CANCEL: (P.STARTING, P.STOPPING_VM, P.RESTORING_REPLICA),
    FailoverJob.PLANNED: (P.CHECKING, P.SHUTTING_DOWN, P.FINAL_CYCLE, P.STARTING_ON_REPLICA),
    FailoverJob.REVERSE: (P.STARTING, P.ASKING_OLD_PRIMARY, P.ENABLING),
}

# Jobs an admin may cancel, and why the others may not. A cancel is honoured
# when the job enters its next phase, so not once it is in its last one; the
# job's undo then puts things back (see the failover service).
CANCELLABLE = frozenset({FailoverJob.TEST, FailoverJob.START, FailoverJob.PLANNED})
NOT_CANCELLABLE: dict[FailoverJob, str] = {
    FailoverJob.STOP_TEST: "it is the undo of a test failover; let it end",
    FailoverJob.COMPLETE: "completing a failover deletes recovery points and cannot be undone",
    FailoverJob.CANCEL: "it is the undo of a failover; let it end",
    FailoverJob.REVERSE: (
        "the old primary may have given the VM up already; let it end and check "
        "'ferry replication status'"
    ),
}
assert CANCELLABLE | set(NOT_CANCELLABLE) == set(FailoverJob)
# What to do instead once a cancellable job is in its last phase; {vm} is filled in.
TOO_LATE: dict[FailoverJob, str] = {
    FailoverJob.TEST: "the test VM is starting; 'ferry failover stop-test {vm}' ends the test",
    FailoverJob.START: "the VM is starting; 'ferry failover cancel {vm}' undoes the failover",
    FailoverJob.PLANNED: "the replica host is starting VM {vm!r} and reversing replication",
}
assert set(TOO_LATE) == CANCELLABLE


def first_phase(job: FailoverJob) -> Phase:
    return PHASES[job][0]


def next_phase(job: FailoverJob, current: str | None, target: Phase) -> Phase:
    """Enter ``target``: only the phase right after ``current`` in the job's sequence."""
    phases = PHASES[job]
    if current in phases and phases.index(Phase(current)) + 1 < len(phases):
        expected = phases[phases.index(Phase(current)) + 1]
        if target is expected:
            return target
    else:
        expected = None
    raise StateError(
        f"a {job.value} job cannot go from phase {current} to {target.value}"
        + (f" (next is {expected.value})" if expected is not None else ""),
        subject=f"a {job.value} job",
    )


def too_late_to_cancel(job: FailoverJob, phase: str | None) -> bool:
    """True once a cancellable job is in its last phase: no later phase would honour it."""
    return phase == PHASES[job][-1].value
