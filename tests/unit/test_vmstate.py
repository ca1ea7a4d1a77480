import pytest

from ferry.core.vmstate import TRANSITIONS, VmOp, VmState, is_live, state_from_qemu, transition
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


def test_off_is_only_left_by_start() -> None:
    leaving = {
        op
        for op, (sources, target) in TRANSITIONS.items()
        if VmState.OFF in sources and target is not VmState.OFF
    }
    assert leaving == {VmOp.START}


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
    assert state_from_qemu(qemu) is ours


def test_live_states() -> None:
    assert is_live(VmState.RUNNING) and is_live(VmState.STOPPING)
    assert not is_live(VmState.OFF) and not is_live(VmState.CRASHED)
