"""Which replication states a planned failover starts from (PlannedFailover.check)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from ferry.core.replication import ReplicationState as S
from ferry.errors import StateError
from ferry.host.failover.planned import PlannedFailover


def _check(state: S) -> Any:
    rel = SimpleNamespace(state=state)
    steps = SimpleNamespace(replication=SimpleNamespace(primary_of=lambda name: ("rec", rel)))
    planned = PlannedFailover(cast(Any, steps), cast(Any, None), cast(Any, None))
    return planned.check("web")


@pytest.mark.parametrize("state", [S.REPLICATING, S.RESYNCHRONISING])
def test_starts_when_the_final_cycle_can_make_the_replica_equal(state: S) -> None:
    assert _check(state) == ("rec", SimpleNamespace(state=state))


@pytest.mark.parametrize("state", [s for s in S if s not in (S.REPLICATING, S.RESYNCHRONISING)])
def test_refused_otherwise_with_the_state_named(state: S) -> None:
    with pytest.raises(StateError, match=f"is {state.value}; a planned failover needs it"):
        _check(state)
