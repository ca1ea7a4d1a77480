"""The cluster-wide records that are not about one node: meta, volumes, events. Pure.

Their JSON is written down in :mod:`ferry.core.cluster.keys`; this module is
the one place that reads and writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


@dataclass(frozen=True)
class ClusterMeta:
    """``meta``: the cluster itself."""

    name: str
    created: float
    functional_level: int

    def to_json(self) -> bytes:
        return json.dumps({"name": self.name, "created": self.created,
                           "functional_level": self.functional_level}).encode()  # fmt: skip

    @classmethod
    def from_json(cls, raw: bytes) -> ClusterMeta:
        data = json.loads(raw)
        return cls(str(data["name"]), float(data.get("created", 0.0)),
                   int(data.get("functional_level", 1)))  # fmt: skip


@dataclass(frozen=True)
class VolumeRecord:
    """``volumes/<name>``: a directory every node sees at the same path."""

    name: str
    path: str

    def to_json(self) -> bytes:
        return json.dumps({"name": self.name, "path": self.path}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> VolumeRecord:
        data = json.loads(raw)
        return cls(str(data["name"]), str(data["path"]))


class EventKind(StrEnum):
    """What ``cluster events`` lists (other helpers add theirs as plain strings)."""

    CREATED = "cluster-created"
    JOINED = "node-joined"
    RECONNECTED = "node-reconnected"
    LEFT = "node-left"
    LEADER = "leader-elected"
    NODE_DOWN = "node-down"
    RESTART = "vm-restart"
    RESTART_REFUSED = "vm-restart-refused"
    VOLUME_ADDED = "volume-added"
    LEASE_REGRANTED = "lease-regranted"


@dataclass(frozen=True)
class EventRecord:
    """``events/<revision-padded>``: one thing that happened, with its time and reason."""

    at: float
    kind: str
    node: str | None = None
    vm: str | None = None
    reason: str = ""

    def to_json(self) -> bytes:
        return json.dumps(self.as_dict()).encode()

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind, "node": self.node, "vm": self.vm,
                "reason": self.reason}  # fmt: skip

    @classmethod
    def from_json(cls, raw: bytes) -> EventRecord:
        data = json.loads(raw)
        return cls(at=float(data.get("at", 0.0)), kind=str(data.get("kind", "")),
                   node=data.get("node"), vm=data.get("vm"),
                   reason=str(data.get("reason", "")))  # fmt: skip
