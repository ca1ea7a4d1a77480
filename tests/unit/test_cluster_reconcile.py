"""The reconciler's decision for one VM: the table of cases."""

from __future__ import annotations

import pytest

from ferry.core.cluster.reconcile import ABSENT, Action, Local, decide
from ferry.core.cluster.roles import Owner, Want

ME, OTHER, THIRD = "n1", "n2", "n3"
RUNNING_HERE = Local(present=True, live=True)
OFF_HERE = Local(present=True, startable=True)
BUSY = Local(present=True, live=True, busy=True)
ALL = {ME, OTHER, THIRD}

CASES = [
    # owner, want, local, alive, self_ok -> action
    (Owner.settled(ME), Want.RUNNING, ABSENT, ALL, True, Action.START),
    (Owner.settled(ME), Want.RUNNING, OFF_HERE, ALL, True, Action.START),
    (Owner.settled(ME), Want.RUNNING, RUNNING_HERE, ALL, True, Action.NOTHING),
    (Owner.settled(ME), Want.OFF, ABSENT, ALL, True, Action.REGISTER),
    (Owner.settled(ME), Want.OFF, OFF_HERE, ALL, True, Action.NOTHING),
    # want off (a stop asked on any node): the owner stops it, even without its lease
    (Owner.settled(ME), Want.OFF, RUNNING_HERE, ALL, True, Action.STOP),
    (Owner.settled(ME), Want.OFF, RUNNING_HERE, ALL - {ME}, False, Action.STOP),
    (Owner.settled(ME), Want.OFF, BUSY, ALL, True, Action.NOTHING),
    # without its own lease a node starts nothing
    (Owner.settled(ME), Want.RUNNING, ABSENT, ALL - {ME}, False, Action.REGISTER),
    (Owner.settled(ME), Want.RUNNING, OFF_HERE, ALL - {ME}, False, Action.NOTHING),
    (Owner.settled(OTHER), Want.RUNNING, RUNNING_HERE, ALL, True, Action.KILL),
    (Owner.settled(OTHER), Want.RUNNING, OFF_HERE, ALL, True, Action.FORGET),
    (Owner.settled(OTHER), Want.RUNNING, ABSENT, ALL, True, Action.NOTHING),
    (None, Want.RUNNING, RUNNING_HERE, ALL, True, Action.KILL),
    # busy: hands off, whatever the store says
    (Owner.settled(OTHER), Want.RUNNING, BUSY, ALL, True, Action.NOTHING),
    (Owner.settled(ME), Want.RUNNING, Local(present=True, busy=True), ALL, True, Action.NOTHING),
    # a pending move, seen from the destination
    (
        Owner.moving(ME, source=OTHER, move="j"),
        Want.RUNNING,
        RUNNING_HERE,
        ALL,
        True,
        Action.CONFIRM,
    ),
    (Owner.moving(ME, source=OTHER, move="j"), Want.RUNNING, ABSENT, ALL, True, Action.NOTHING),
    (Owner.moving(ME, source=OTHER, move="j"), Want.RUNNING, ABSENT, {ME}, True, Action.TAKE),
    (Owner.moving(ME, source=OTHER, move="j"), Want.RUNNING, ABSENT, {ME}, False, Action.NOTHING),
    # ... from the source
    (
        Owner.moving(OTHER, source=ME, move="j"),
        Want.RUNNING,
        RUNNING_HERE,
        ALL,
        True,
        Action.RECLAIM,
    ),
    (Owner.moving(OTHER, source=ME, move="j"), Want.RUNNING, ABSENT, ALL, True, Action.RELEASE),
    (Owner.moving(OTHER, source=ME, move="j"), Want.RUNNING, RUNNING_HERE, ALL, False, Action.KILL),
    # ... from a third node
    (
        Owner.moving(OTHER, source=THIRD, move="j"),
        Want.RUNNING,
        RUNNING_HERE,
        ALL,
        True,
        Action.KILL,
    ),
]


@pytest.mark.parametrize(("owner", "want", "local", "alive", "self_ok", "action"), CASES)
def test_decide(owner: Owner | None, want: Want, local: Local, alive: set[str],
                self_ok: bool, action: Action) -> None:  # fmt: skip
    assert decide(ME, owner, want, local, alive=alive, self_ok=self_ok) is action


def test_a_pending_move_is_never_started_by_either_side() -> None:
    for owner in (Owner.moving(ME, source=OTHER, move="j"),
                  Owner.moving(OTHER, source=ME, move="j")):  # fmt: skip
        for local in (ABSENT, OFF_HERE):
            assert decide(ME, owner, Want.RUNNING, local, alive=ALL, self_ok=True) is not (
                Action.START
            )


def test_owner_record_round_trip() -> None:
    owner = Owner.moving(OTHER, source=ME, move="job-1")
    assert Owner.decode(owner.encode()) == owner
    assert b'"from": "n1"' in owner.encode()
