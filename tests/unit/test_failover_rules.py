"""The failover state machine and job phases (ferry.core.failover), driven as tables."""

from __future__ import annotations

import itertools

import pytest

from ferry.core import failover as machine
from ferry.core.failover import (
    CANCELLABLE,
    NOT_CANCELLABLE,
    PHASES,
    TRANSITIONS,
    FailoverJob,
    FailoverOp,
    FailoverState,
    Phase,
    advance,
    apply,
    next_phase,
    state_of,
    too_late_to_cancel,
)
from ferry.core.relationship import Relationship, Role
from ferry.core.replication import ReplicationState
from ferry.errors import StateError

F = FailoverState
Op = FailoverOp

# (state, op) -> the state it leads to; every pair not listed is refused.
ALLOWED = {
    (F.NONE, Op.TEST): F.TESTING,
    (F.TESTING, Op.STOP_TEST): F.NONE,
    (F.NONE, Op.START): F.FAILED_OVER,
    (F.FAILED_OVER, Op.COMPLETE): F.COMPLETED,
    (F.COMPLETED, Op.COMPLETE): F.COMPLETED,
    (F.FAILED_OVER, Op.CANCEL): F.NONE,
    (F.FAILED_OVER, Op.REVERSE): F.NONE,
    (F.COMPLETED, Op.REVERSE): F.NONE,
}


@pytest.mark.parametrize(("state", "op"), list(itertools.product(F, Op)))
def test_every_operation_from_every_state(state: FailoverState, op: FailoverOp) -> None:
    if (state, op) in ALLOWED:
        assert apply(state, op, vm="web") is ALLOWED[(state, op)]
        return
    with pytest.raises(StateError) as info:
        apply(state, op, vm="web", host="host-2")
    error = info.value
    assert error.state is state and error.op is op
    assert set(error.required) == TRANSITIONS[op][0]
    assert "web" in str(error) and "\n" not in str(error)


def test_refusals_keep_their_remedies() -> None:
    def refusal(state: FailoverState, op: FailoverOp) -> str:
        with pytest.raises(StateError) as info:
            apply(state, op, vm="web", host="host-2")
        return str(info.value)

    assert refusal(F.TESTING, Op.TEST) == (
        "a test failover of VM 'web' runs already; 'ferry failover stop-test web' ends it"
    )
    assert refusal(F.NONE, Op.STOP_TEST) == "no test failover of VM 'web' runs on host 'host-2'"
    assert "stop it first" in refusal(F.TESTING, Op.START)
    assert "cannot be cancelled any more" in refusal(F.COMPLETED, Op.CANCEL)
    assert "nothing to reverse" in refusal(F.NONE, Op.REVERSE)
    refused = {(op, state) for state, op in itertools.product(F, Op) if (state, op) not in ALLOWED}
    assert refused == set(machine.REFUSALS)  # every refusal says what to do


def _rel(**kw: object) -> Relationship:
    fields: dict[str, object] = {"vm_uuid": "u-1", "vm_name": "web", "role": Role.REPLICA,
                                 "primary": "host-1", "replica": "host-2",
                                 "state": ReplicationState.REPLICATING}  # fmt: skip
    return Relationship.model_validate({**fields, **kw})


def test_advance_writes_state_points_and_the_replication_state_together() -> None:
    rel = _rel()
    tested = advance(rel, Op.TEST, point=3, test_vm="t-1")
    assert (tested.failover, tested.test_point, tested.test_vm) == (F.TESTING, 3, "t-1")
    assert tested.state is ReplicationState.REPLICATING  # replication goes on
    stopped = advance(tested, Op.STOP_TEST)
    assert (stopped.failover, stopped.test_point, stopped.test_vm) == (F.NONE, None, None)

    over = advance(rel, Op.START, point=2)
    assert (over.failover, over.failover_point) == (F.FAILED_OVER, 2)
    assert over.state is ReplicationState.FAILED_OVER
    back = advance(over, Op.CANCEL)
    assert (back.failover, back.failover_point) == (F.NONE, None)
    assert back.state is ReplicationState.REPLICATING
    done = advance(over, Op.COMPLETE)
    assert (done.failover, done.failover_point) == (F.COMPLETED, 2)
    assert rel.failover is F.NONE  # a copy: the caller writes it


def test_advance_refuses_what_either_table_refuses() -> None:
    with pytest.raises(StateError, match="replication of VM 'web'"):
        advance(_rel(state=ReplicationState.INITIAL_COPY), Op.START, point=1)
    with pytest.raises(StateError, match="stop it first"):
        advance(_rel(failover=F.TESTING), Op.START, point=1)
    with pytest.raises(ValueError, match="needs point"):
        advance(_rel(), Op.START)


def test_a_walk_through_the_table_is_each_failover_s_life() -> None:
    walks = {
        "drill": [(Op.TEST, F.TESTING), (Op.STOP_TEST, F.NONE)],
        "cancelled": [(Op.START, F.FAILED_OVER), (Op.CANCEL, F.NONE)],
        "reversed": [
            (Op.START, F.FAILED_OVER),
            (Op.COMPLETE, F.COMPLETED),
            (Op.REVERSE, F.NONE),
        ],
    }
    for steps in walks.values():
        state = F.NONE
        for op, expected in steps:
            state = apply(state, op)
            assert state is expected


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({}, F.NONE),
        ({"test_vm": "t-1", "test_point": 2}, F.TESTING),
        ({"state": "failed-over", "failover_point": 2}, F.FAILED_OVER),
        ({"state": "failed-over", "failover_point": 2, "committed": True}, F.COMPLETED),
        ({"state": "failed-over", "test_vm": "t-1"}, F.FAILED_OVER),
    ],
)
def test_documents_from_before_the_failover_state_are_upgraded(
    document: dict[str, object], expected: FailoverState
) -> None:
    assert state_of(document) is expected
    rel = _rel(**document)  # with "committed", which the model no longer has
    assert rel.failover is expected
    assert Relationship.model_validate_json(rel.model_dump_json()) == rel


def test_phases_are_walked_in_order_only() -> None:
    for job, phases in PHASES.items():
        for current, target in itertools.pairwise(phases):
            assert next_phase(job, current.value, target) is target
        with pytest.raises(StateError, match=f"a {job.value} job cannot go"):
            next_phase(job, phases[-1].value, phases[0])
        if len(phases) > 2:
            with pytest.raises(StateError, match=f"next is {phases[1].value}"):
                next_phase(job, phases[0].value, phases[2])  # no skipping
    with pytest.raises(StateError):
        next_phase(FailoverJob.TEST, "done", Phase.STARTING_VM)


def test_which_jobs_can_be_cancelled_and_until_when() -> None:
    assert {FailoverJob.TEST, FailoverJob.START, FailoverJob.PLANNED} == CANCELLABLE
    assert set(NOT_CANCELLABLE) == set(FailoverJob) - CANCELLABLE
    assert not too_late_to_cancel(FailoverJob.PLANNED, "shutting-down")
    assert too_late_to_cancel(FailoverJob.PLANNED, "starting-on-replica")
    assert too_late_to_cancel(FailoverJob.TEST, "starting-vm")
    assert machine.first_phase(FailoverJob.PLANNED) is Phase.CHECKING
