import pytest

from ferry.core.migration import (
    FINAL,
    NEXT,
    Phase,
    Storage,
    advance,
    cancellable,
    choose_storage,
    locate_on_volume,
)
from ferry.errors import InvalidInputError, StateError


def test_a_move_walks_its_phases_in_order() -> None:
    phase = Phase.QUEUED
    for step in (Phase.PREPARING, Phase.COPYING_DISKS, Phase.COPYING_MEMORY,
                 Phase.SWITCHING_OVER, Phase.DONE):  # fmt: skip
        phase = advance(phase, step)
    assert phase is Phase.DONE


def test_memory_only_moves_skip_the_disk_phase() -> None:
    assert advance(Phase.PREPARING, Phase.COPYING_MEMORY) is Phase.COPYING_MEMORY


def test_no_way_back_and_no_leaving_an_end() -> None:
    with pytest.raises(StateError, match="from copying-memory to preparing"):
        advance(Phase.COPYING_MEMORY, Phase.PREPARING)
    for end in FINAL:
        assert NEXT[end] == frozenset()


def test_switch_over_cannot_be_cancelled_only_failed() -> None:
    assert Phase.CANCELLED not in NEXT[Phase.SWITCHING_OVER]
    assert not cancellable(Phase.SWITCHING_OVER)
    assert all(cancellable(p) for p in (Phase.QUEUED, Phase.PREPARING, Phase.COPYING_DISKS,
                                        Phase.COPYING_MEMORY))  # fmt: skip
    assert not any(cancellable(p) for p in FINAL)


def test_every_live_phase_can_fail() -> None:
    for phase, nexts in NEXT.items():
        if phase not in FINAL:
            assert Phase.FAILED in nexts


@pytest.mark.parametrize(
    ("requested", "visible", "chosen"),
    [
        (Storage.AUTO, True, Storage.SHARED),
        (Storage.AUTO, False, Storage.COPY),
        (Storage.SHARED, True, Storage.SHARED),
        (Storage.COPY, True, Storage.COPY),
        (Storage.COPY, False, Storage.COPY),
    ],
)
def test_storage_choice(requested: Storage, visible: bool, chosen: Storage) -> None:
    assert choose_storage(requested, visible=visible, vm="v", host="h") is chosen


def test_shared_without_visible_disks_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="host 'h' cannot see the disks of VM 'v'"):
        choose_storage(Storage.SHARED, visible=False, vm="v", host="h")


def test_disks_are_located_on_the_longest_matching_volume() -> None:
    volumes = {"a": "/srv/vol", "b": "/srv/vol/inner", "c": "/srv/volume2"}
    assert locate_on_volume("/srv/vol/x/disk0.qcow2", volumes) == ("a", "x/disk0.qcow2")
    assert locate_on_volume("/srv/vol/inner/d.qcow2", volumes) == ("b", "d.qcow2")
    assert locate_on_volume("/srv/volume2/d.qcow2", volumes) == ("c", "d.qcow2")
    assert locate_on_volume("/srv/volumeX/d.qcow2", volumes) is None
    assert locate_on_volume("/srv/vol", volumes) is None
