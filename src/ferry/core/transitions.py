"""The one rule every life cycle table in ferry follows (VMs, replication).

A table maps each operation to (the states it is allowed in, the state it
leads to). Asking for an operation in any other state is refused in one way,
naming the state it is in and the states that would allow it (the typed
fields of :class:`~ferry.errors.StateError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

from ferry.errors import StateError

State = TypeVar("State", bound=StrEnum)
Op = TypeVar("Op", bound=StrEnum)


def apply(
    table: Mapping[Op, tuple[frozenset[State], State]], state: State, op: Op, *, subject: str
) -> State:
    """The state ``op`` leads to from ``state``, or StateError about ``subject``."""
    sources, target = table[op]
    if state not in sources:
        raise StateError(subject=subject, op=op, state=state, required=sources)
    return target
