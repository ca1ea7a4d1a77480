import pytest

from ferry.core.vmstate import (
    OBSERVED,
    TRANSITIONS,
    QemuStatus,
    VmOp,
    VmState,
    confirmed,
    is_live,
    launched,
    observed,
    state_from_qemu,
    transition,
)
from ferry.errors import StateError


def test_a_full_life_cycle_walks_the_table() -> None:
    state = VmState.OFF
    for op, expected in [
        (VmOp.START, VmState.STARTING),
        (VmOp.STARTED, VmState.RUNNING),
        (VmOp.PAUSE, VmState.PAUSED),
        (VmOp.RESUME, VmState.RUNNING),
        (VmOp.STOP, VmState.STOPPING),
        (VmOp.STOPPED, VmState.OFF),
        (VmOp.DELETE, VmState.OFF),
    ]:
        state = transition(state, op)
        assert state is expected


def test_starting_a_running_vm_names_both_states() -> None:
    with pytest.raises(StateError) as info:
        transition(VmState.RUNNING, VmOp.START, vm="web")
    assert str(info.value) == "cannot start VM 'web': it is running (needs: crashed, off)"


def test_deleting_a_running_vm_is_refused() -> None:
    with pytest.raises(StateError, match="it is running"):
        transition(VmState.RUNNING, VmOp.DELETE, vm="web")


def test_a_crashed_vm_can_be_started_again_or_killed() -> None:
    assert transition(VmState.CRASHED, VmOp.START) is VmState.STARTING
    assert transition(VmState.CRASHED, VmOp.KILL) is VmState.OFF


def test_every_operation_has_sources_and_a_target() -> None:
    assert set(TRANSITIONS) == set(VmOp)
    for sources, target in TRANSITIONS.values():
        assert sources
        assert isinstance(target, VmState)


def test_off_is_only_left_by_start_or_by_becoming_a_replica() -> None:
    leaving = {
        op
        for op, (sources, target) in TRANSITIONS.items()
        if VmState.OFF in sources and target is not VmState.OFF
    }
    # make-replica: replication adopts an off VM as its chain's base, and a
    # cancelled failover turns the killed VM back into the replica.
    assert leaving == {VmOp.START, VmOp.MAKE_REPLICA}


@pytest.mark.parametrize(
    ("qemu", "ours"),
    [
        ("running", VmState.RUNNING),
        ("paused", VmState.PAUSED),
        ("shutdown", VmState.OFF),
        ("guest-panicked", VmState.CRASHED),
        ("inmigrate", VmState.MIGRATING),
        ("prelaunch", VmState.STARTING),
        ("something-new", VmState.CRASHED),
    ],
)
def test_qemu_states_map_onto_ours(qemu: str, ours: VmState) -> None:
    assert state_from_qemu(QemuStatus(qemu)) is ours


def test_live_states() -> None:
    assert is_live(VmState.RUNNING) and is_live(VmState.STOPPING)
    assert not is_live(VmState.OFF) and not is_live(VmState.CRASHED)


@pytest.mark.parametrize("op", list(VmOp))
@pytest.mark.parametrize("state", list(VmState))
def test_every_operation_from_every_state(state: VmState, op: VmOp) -> None:
    sources, target = TRANSITIONS[op]
    if state in sources:
        assert transition(state, op, vm="web") is target
        return
    with pytest.raises(StateError) as info:
        transition(state, op, vm="web")
    error = info.value
    assert error.state is state and error.op is op
    assert error.required == tuple(sorted(sources, key=lambda s: s.value))
    assert error.code == "wrong-state"
    wanted = ", ".join(s.value for s in error.required)
    assert str(error) == f"cannot {op.value} VM 'web': it is {state.value} (needs: {wanted})"


def test_a_state_error_with_only_a_message_has_empty_fields() -> None:
    error = StateError("job 7 has already ended")
    assert str(error) == "job 7 has already ended"
    assert error.state is None and error.op is None and error.required == ()


def test_every_qemu_status_is_observed_as_some_operation() -> None:
    assert set(OBSERVED) == set(QemuStatus)


def test_a_status_qemu_adds_later_is_unknown_and_taken_for_a_crash() -> None:
    assert QemuStatus("colo-next") is QemuStatus.UNKNOWN
    assert observed(QemuStatus.UNKNOWN) is VmOp.CRASHED


def test_observing_is_allowed_only_where_a_qemu_may_belong_to_the_vm() -> None:
    for status in QemuStatus:
        sources, _ = TRANSITIONS[observed(status)]
        assert VmState.OFF not in sources and VmState.REPLICA not in sources
        assert VmState.CRASHED in sources  # a panicked guest's QEMU stays attached


@pytest.mark.parametrize(
    ("status", "paused", "op"),
    [
        (QemuStatus.RUNNING, False, VmOp.STARTED),
        (QemuStatus.PRELAUNCH, True, VmOp.STARTED_PAUSED),
        (QemuStatus.PRELAUNCH, False, VmOp.OBSERVED_PRELAUNCH),  # still starting
        (QemuStatus.GUEST_PANICKED, False, VmOp.CRASHED),
        (QemuStatus.IO_ERROR, True, VmOp.CRASHED),
    ],
)
def test_a_start_records_started_when_qemu_agrees(
    status: QemuStatus, paused: bool, op: VmOp
) -> None:
    assert launched(status, paused=paused) is op


def test_a_step_is_confirmed_by_qemu_or_replaced_by_what_qemu_says() -> None:
    assert confirmed(VmOp.ARRIVED, QemuStatus.RUNNING) is VmOp.ARRIVED
    assert confirmed(VmOp.MIGRATE_ABORTED, QemuStatus.RUNNING) is VmOp.MIGRATE_ABORTED
    assert confirmed(VmOp.MIGRATE_ABORTED, QemuStatus.PAUSED) is VmOp.OBSERVED_PAUSED
    assert confirmed(VmOp.ARRIVED, QemuStatus.GUEST_PANICKED) is VmOp.CRASHED


def test_a_move_walks_the_table_on_both_hosts() -> None:
    source = transition(VmState.RUNNING, VmOp.MIGRATE)
    assert source is VmState.MIGRATING  # then the source forgets the VM
    assert transition(VmState.MIGRATING, VmOp.ARRIVED) is VmState.RUNNING  # destination
    assert transition(source, VmOp.MIGRATE_ABORTED) is VmState.RUNNING  # undone
    with pytest.raises(StateError, match="it is paused"):
        transition(VmState.PAUSED, VmOp.MIGRATE, vm="web")
