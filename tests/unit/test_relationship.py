"""The pure decisions of a replication cycle: what to cut, and what an interrupted backup leaves."""

from __future__ import annotations

import pytest

from ferry.core.relationship import (
    CycleInFlight,
    CycleMode,
    InitialMethod,
    PendingPoint,
    Relationship,
    Role,
    Verdict,
    cycle_mode,
    resume,
    settle_in_flight,
)
from ferry.core.replication import ReplicationState as S
from ferry.errors import StateError

UUID = "0f0e0d0c-0b0a-0908-0706-050403020100"


def rel(state: S = S.REPLICATING, **changes: object) -> Relationship:
    base = Relationship(vm_uuid=UUID, vm_name="web", role=Role.PRIMARY, primary="a",
                        replica="b", state=state)  # fmt: skip
    return base.model_copy(update=changes)


@pytest.mark.parametrize(
    ("state", "initial", "confirmed", "bitmap", "mode", "after"),
    [
        (S.INITIAL_COPY, InitialMethod.NETWORK, None, False, CycleMode.FULL, S.INITIAL_COPY),
        (S.INITIAL_COPY, InitialMethod.MEDIA, None, True, CycleMode.WAIT, S.INITIAL_COPY),
        (S.INITIAL_COPY, InitialMethod.EXISTING, None, False, CycleMode.RESYNC, S.INITIAL_COPY),
        # The adopted image is linked as -1: the initial copy is still to come.
        (S.INITIAL_COPY, InitialMethod.EXISTING, -1, True, CycleMode.RESYNC, S.INITIAL_COPY),
        # The media were imported (point 0 linked): deltas from now on.
        (S.INITIAL_COPY, InitialMethod.MEDIA, 0, True, CycleMode.DELTA, S.REPLICATING),
        (S.REPLICATING, InitialMethod.NETWORK, 7, True, CycleMode.DELTA, S.REPLICATING),
        (S.REPLICATING, InitialMethod.NETWORK, 7, False, CycleMode.RESYNC, S.RESYNCHRONISING),
        (S.RESYNCHRONISING, InitialMethod.NETWORK, 7, True, CycleMode.RESYNC, S.RESYNCHRONISING),
    ],
)
def test_cycle_mode(state: S, initial: InitialMethod, confirmed: int | None, bitmap: bool,
                    mode: CycleMode, after: S) -> None:  # fmt: skip
    got, new = cycle_mode(rel(state, initial=initial, confirmed_point=confirmed),
                          bitmap_usable=bitmap)  # fmt: skip
    assert (got, new.state) == (mode, after)


def test_an_initial_copy_scheduled_for_later_waits() -> None:
    later = rel(S.INITIAL_COPY, initial_after=1000.0)
    assert cycle_mode(later, bitmap_usable=False, now=999.0)[0] is CycleMode.WAIT
    assert cycle_mode(later, bitmap_usable=False, now=1000.0)[0] is CycleMode.FULL


@pytest.mark.parametrize(
    ("interrupted", "back"),
    [(None, S.REPLICATING), (S.REPLICATING, S.REPLICATING),
     (S.INITIAL_COPY, S.INITIAL_COPY), (S.RESYNCHRONISING, S.RESYNCHRONISING)],
)  # fmt: skip
def test_resume_returns_to_the_interrupted_state(interrupted: S | None, back: S) -> None:
    for stopped in (S.PAUSED, S.ERROR):
        resumed = resume(rel(stopped, resume_to=interrupted, error="x"))
        assert (resumed.state, resumed.error, resumed.resume_to) == (back, None, None)


def test_only_paused_or_error_resume() -> None:
    with pytest.raises(StateError, match="it is replicating"):
        resume(rel(S.REPLICATING))


def flight(*, full: bool = False) -> CycleInFlight:
    return CycleInFlight(id=4, time=12.5, tag="t", files=("/p/p4-disk0.qcow2",), full=full)


def test_a_finished_delta_becomes_pending_after_the_ones_before() -> None:
    earlier = PendingPoint(id=3, time=10.0, files=("/p/p3-disk0.qcow2",))
    settled, keep = settle_in_flight(rel(in_flight=flight(), pending=(earlier,)), Verdict.OK)
    assert keep and settled.in_flight is None
    assert [p.id for p in settled.pending] == [3, 4] and settled.pending[1].time == 12.5
    assert settled.state is S.REPLICATING


def test_a_failed_backup_is_dropped_its_changes_are_in_the_bitmap() -> None:
    settled, keep = settle_in_flight(rel(in_flight=flight()), Verdict.FAILED)
    assert not keep and settled.pending == () and settled.state is S.REPLICATING


def test_an_unknown_outcome_resynchronises() -> None:
    settled, keep = settle_in_flight(rel(in_flight=flight()), Verdict.UNKNOWN)
    assert not keep and settled.state is S.RESYNCHRONISING and settled.in_flight is None


def test_a_full_copy_is_kept_only_as_the_initial_network_copy() -> None:
    initial = rel(S.INITIAL_COPY, in_flight=flight(full=True))
    settled, keep = settle_in_flight(initial, Verdict.OK)
    assert keep and settled.pending[0].full
    # Cut for a resynchronisation: the patch was never built, so start over.
    resync = rel(S.RESYNCHRONISING, in_flight=flight(full=True))
    settled, keep = settle_in_flight(resync, Verdict.OK)
    assert not keep and settled.state is S.RESYNCHRONISING
    media = rel(S.INITIAL_COPY, initial=InitialMethod.MEDIA, in_flight=flight(full=True))
    assert settle_in_flight(media, Verdict.OK)[1] is False


def test_nothing_in_flight_changes_nothing() -> None:
    plain = rel()
    assert settle_in_flight(plain, Verdict.UNKNOWN) == (plain, False)
