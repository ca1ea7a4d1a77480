"""A cluster node's state, read from its records in the store: pure.

Theory of operation. A node has up to three records (see
:mod:`ferry.core.cluster.keys`): ``members/<node>`` (permanent until it
leaves), ``alive/<node>`` (put with the node's lease, so etcd deletes it when
the lease expires by etcd's clock) and ``fenced/<node>`` (the node killed its
clustered QEMUs itself, or was declared fenced). The state is a function of
which are there, checked in this order::

    fenced/<node> present, not yet rejoined   -> fenced
    alive/<node> absent                       -> down
    members/<node>.draining true              -> draining
    otherwise                                 -> up

"Rejoined": the node's alive record was created after the fenced mark was
last written (a fenced node takes a new lease only after the leader had its
chance to move its VMs away). Then the mark is history and the node is up
again, so its reconciler starts the VMs it still owns: when etcd itself was
away, every node fenced and none could have taken them over.

Only ``up`` nodes take new VMs; ``down`` is the one state in which the HA
leader may move a node's VMs away (its lease is gone, so its QEMUs are).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.store import Entry


class NodeState(StrEnum):
    UP = "up"
    DOWN = "down"
    DRAINING = "draining"
    FENCED = "fenced"


@dataclass(frozen=True)
class MemberRecord:
    """``members/<node>``: what a node said about itself when it joined or reconnected."""

    name: str
    url: str
    version: str
    functional_level: int
    joined: float
    draining: bool = False

    def to_json(self) -> bytes:
        return json.dumps({"name": self.name, "url": self.url, "version": self.version,
                           "functional_level": self.functional_level, "joined": self.joined,
                           "draining": self.draining}).encode()  # fmt: skip

    @classmethod
    def from_json(cls, raw: bytes) -> MemberRecord:
        data = json.loads(raw)
        return cls(name=str(data["name"]), url=str(data.get("url", "")),
                   version=str(data.get("version", "")),
                   functional_level=int(data.get("functional_level", 1)),
                   joined=float(data.get("joined", 0.0)),
                   draining=bool(data.get("draining", False)))  # fmt: skip


@dataclass(frozen=True)
class AliveRecord:
    """``alive/<node>``: refreshed by the node while its lease lives."""

    name: str
    memory_free: int
    at: float

    def to_json(self) -> bytes:
        return json.dumps({"name": self.name, "memory_free": self.memory_free,
                           "at": self.at}).encode()  # fmt: skip

    @classmethod
    def from_json(cls, raw: bytes) -> AliveRecord:
        data = json.loads(raw)
        return cls(str(data["name"]), int(data.get("memory_free", 0)), float(data.get("at", 0)))


@dataclass(frozen=True)
class NodeView:
    """One node as ``cluster show`` and placement see it."""

    name: str
    url: str
    state: NodeState
    functional_level: int
    version: str
    memory_free: int  # bytes; 0 when the node is not alive
    vms: int  # clustered VMs this node owns

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "state": self.state.value,
                "functional_level": self.functional_level, "version": self.version,
                "memory_free": self.memory_free, "vms": self.vms}  # fmt: skip


def node_state(member: MemberRecord, *, alive: bool, fenced: bool) -> NodeState:
    """The table of the module docstring."""
    if fenced:
        return NodeState.FENCED
    if not alive:
        return NodeState.DOWN
    if member.draining:
        return NodeState.DRAINING
    return NodeState.UP


def still_fenced(mark: Entry | None, alive: Entry | None) -> bool:
    """Whether a node with this ``fenced`` mark and ``alive`` record counts as fenced:
    the mark is there and the node has not rejoined since (its alive record, if
    any, was created before the mark was last written)."""
    return mark is not None and (alive is None or alive.create_revision < mark.mod_revision)


def owner_of(raw: bytes) -> str:
    """The node named by a ``vms/<uuid>/owner`` value (``{"node", "since"}``)."""
    return str(json.loads(raw)["node"])


def node_views(entries: Iterable[Entry], keys: ClusterKeys) -> list[NodeView]:
    """Every member's view, by name, from the entries of a range over the cluster's prefix.

    ``entries`` may hold any keys of the cluster (one range over the prefix);
    only members, alive and fenced records and VM owners are read.
    """
    members: dict[str, MemberRecord] = {}
    alive: dict[str, AliveRecord] = {}
    alive_entries: dict[str, Entry] = {}
    marks: dict[str, Entry] = {}
    owned: dict[str, int] = {}
    for entry in entries:
        key = entry.key
        if key.startswith(keys.members):
            record = MemberRecord.from_json(entry.value)
            members[record.name] = record
        elif key.startswith(keys.alive_prefix):
            alive[ClusterKeys.last_part(key)] = AliveRecord.from_json(entry.value)
            alive_entries[ClusterKeys.last_part(key)] = entry
        elif key.startswith(keys.fenced_prefix):
            marks[ClusterKeys.last_part(key)] = entry
        elif key.startswith(keys.vms) and key.endswith("/owner"):
            node = owner_of(entry.value)
            owned[node] = owned.get(node, 0) + 1
    fenced = {name for name, mark in marks.items() if still_fenced(mark, alive_entries.get(name))}
    return [_view(members[name], alive.get(name), name in fenced, owned.get(name, 0))
            for name in sorted(members)]  # fmt: skip


def _view(member: MemberRecord, alive: AliveRecord | None, fenced: bool, vms: int) -> NodeView:
    state = node_state(member, alive=alive is not None, fenced=fenced)
    return NodeView(name=member.name, url=member.url, state=state,
                    functional_level=member.functional_level, version=member.version,
                    memory_free=alive.memory_free if alive else 0, vms=vms)  # fmt: skip


def by_name(views: Iterable[NodeView]) -> Mapping[str, NodeView]:
    return {view.name: view for view in views}
