"""Extended replication as pure rules: frequencies, the retention pin, confirmations, delays."""

from __future__ import annotations

import pytest

from ferry.core.relationship import Extension, extension_confirmed, extension_pin
from ferry.core.replication import (
    IDLE_DELAY_S,
    PointInfo,
    check_extended_frequency,
    cycle_delay,
    default_extended_frequency,
    retention_plan,
)
from ferry.core.replication import ReplicationState as S
from ferry.errors import InvalidInputError

UUID = "0f0e0d0c-0b0a-0908-0706-050403020100"


def ext(**changes: object) -> Extension:
    base = Extension(vm_uuid=UUID, vm_name="web", host="c", url="https://c", frequency_s=300)
    return base.model_copy(update=changes)


@pytest.mark.parametrize(("seconds", "primary"), [(300, 30), (300, 300), (900, 300), (900, 900)])
def test_extended_frequency_allowed(seconds: int, primary: int) -> None:
    assert check_extended_frequency(seconds, primary) == seconds


def test_extended_frequency_is_5m_or_15m() -> None:
    with pytest.raises(InvalidInputError, match="use 5m or 15m"):
        check_extended_frequency(30, 30)
    with pytest.raises(InvalidInputError, match="use 5m or 15m"):
        check_extended_frequency(600, 30)


def test_extended_frequency_not_more_often_than_the_primary() -> None:
    with pytest.raises(InvalidInputError, match=r"more often than its primary replicates \(15m\)"):
        check_extended_frequency(300, 900, vm="web")


def test_default_extended_frequency() -> None:
    assert default_extended_frequency(30) == 300
    assert default_extended_frequency(900) == 900


def test_pin_is_the_confirmed_point_then_the_one_being_sent() -> None:
    assert extension_pin(None) is None
    assert extension_pin(ext()) is None  # nothing cut yet: nothing to hold back
    assert extension_pin(ext(sending_point=7)) == 7
    assert extension_pin(ext(confirmed_point=5, sending_point=9)) == 5


def test_pin_holds_back_merges_of_points_the_extended_host_lacks() -> None:
    chain = [PointInfo(i, float(i), "base" if i == 1 else f"p{i}") for i in range(1, 7)]
    pin = extension_pin(ext(confirmed_point=3))
    assert pin is not None
    in_use = {p.id for p in chain if p.id > pin}
    merges = retention_plan(chain, 1, in_use=in_use)
    # Without the pin 1..4 would merge away; with it only what host c has (1, 2)
    # folds into the base, and point 3 (c's latest) stays as the next cut's bottom.
    assert [m.overlay.id for m in merges] == [2]
    assert [m.overlay.id for m in retention_plan(chain, 1)] == [2, 3, 4, 5]


def test_confirmation_ends_the_initial_copy_and_clears_the_sent_point() -> None:
    sent = ext(sending_point=4)
    assert extension_confirmed(sent, None) == sent
    assert extension_confirmed(sent, -1) == sent  # an adopted image is not a point
    done = extension_confirmed(sent, 4)
    assert done.state is S.REPLICATING and done.confirmed_point == 4 and done.sending_point is None
    later = extension_confirmed(done.model_copy(update={"sending_point": 8}), 4)
    assert later.sending_point == 8  # still on its way


def test_cycle_delay() -> None:
    assert cycle_delay(S.REPLICATING, None, 300, 1000.0) == 0.0
    assert cycle_delay(S.REPLICATING, 900.0, 300, 1000.0) == 200.0
    # An off VM's due cycle is skipped without a start: poll, never spin at 0.
    assert cycle_delay(S.REPLICATING, 100.0, 300, 1000.0, vm_live=False) == 5.0
    assert cycle_delay(S.REPLICATING, 100.0, 3, 1000.0, vm_live=False) == 3.0
    assert cycle_delay(S.PAUSED, 900.0, 300, 1000.0) == IDLE_DELAY_S
    assert cycle_delay(S.INITIAL_COPY, None, 300, 1000.0, not_before=1500.0) == 500.0
    assert cycle_delay(S.REPLICATING, None, 300, 1000.0, not_before=1500.0) == 0.0
