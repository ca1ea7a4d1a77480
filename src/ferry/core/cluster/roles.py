"""A clustered VM's records in the store (its *role*): config, owner, want. Pure.

Written down once here, the values of the keys ``vms/<uuid>/...`` of
:mod:`.keys` (JSON)::

    config  {"spec": VmSpec, "priority": "high"|"medium"|"low", "volume": "<cluster volume>"}
    owner   {"node": "<node>", "since": <unix time>,
             "from": "<node>" | null, "move": "<job id>" | null}
    want    "running" | "off"

``owner`` changes only by compare-and-swap on its ``mod_revision``. While a
live move switches over, ``owner`` names the destination with ``from`` (the
source) and ``move`` set: the move is *pending* until the source confirms
(the destination resumed) or takes the VM back (it could not). Nobody starts
a VM whose move is pending (see :mod:`.reconcile`).
"""

from __future__ import annotations

import json
import time
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, ValidationError

from ferry.core.spec import VmSpec
from ferry.errors import InvalidInputError


class Priority(StrEnum):
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"

    @property
    def rank(self) -> int:
        """Sort key: high first."""
        return (Priority.HIGH, Priority.MEDIUM, Priority.LOW).index(self)


def parse_priority(text: str) -> Priority:
    try:
        return Priority(text)
    except ValueError:
        raise InvalidInputError(f"priority must be high, medium or low, not {text!r}") from None


class Want(StrEnum):
    RUNNING = "running"
    OFF = "off"


class VmRole(BaseModel):
    """``vms/<uuid>/config``."""

    model_config = ConfigDict(frozen=True)

    spec: VmSpec
    priority: Priority = Priority.MEDIUM
    volume: str


class Owner(BaseModel):
    """``vms/<uuid>/owner``."""

    model_config = ConfigDict(frozen=True)

    node: str
    since: float = 0.0
    source: str | None = None  # JSON "from": the source node of a pending move
    move: str | None = None  # the pending move's job id

    @property
    def pending(self) -> bool:
        return self.source is not None

    @classmethod
    def settled(cls, node: str) -> Owner:
        return cls(node=node, since=time.time())

    @classmethod
    def moving(cls, node: str, *, source: str, move: str) -> Owner:
        return cls(node=node, since=time.time(), source=source, move=move)

    def encode(self) -> bytes:
        return json.dumps({"node": self.node, "since": self.since, "from": self.source,
                           "move": self.move}).encode()  # fmt: skip

    @classmethod
    def decode(cls, raw: bytes) -> Owner:
        data = json.loads(raw)
        return cls(node=data["node"], since=data.get("since", 0.0), source=data.get("from"),
                   move=data.get("move"))  # fmt: skip


def encode_role(role: VmRole) -> bytes:
    return role.model_dump_json().encode()


def decode_role(raw: bytes, *, key: str) -> VmRole:
    try:
        return VmRole.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidInputError(
            f"the cluster store holds an unreadable VM config at {key}"
        ) from exc


def decode_want(raw: bytes | None) -> Want:
    if raw is None:
        return Want.OFF
    try:
        return Want(raw.decode())
    except ValueError:
        return Want.OFF
