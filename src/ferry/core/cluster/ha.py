"""What the HA leader does about lost nodes: a pure function of the store's contents.

Theory of operation. A node is *lost* when its ``alive/<node>`` key is gone:
etcd deleted it because the node's lease expired by etcd's own clock, so the
node's fencing (its LeaseKeeper and guard, which act before the TTL ends)
has killed its clustered QEMUs. :func:`plan` reads one range over the
cluster's prefix and returns, for the VMs owned by lost nodes whose ``want``
is ``running``:

- a :class:`Restart` per VM that a node can take, placed by
  :func:`ferry.core.cluster.placement.place_all` (the up node with the most
  free memory that runs the VM's configuration version; each placed VM's
  memory counts against its node), high priority first, then by name;
- a :class:`Refused` per VM that no node can take, with the placement's reason.

A VM whose move is pending (``owner`` names a destination and ``from`` a
source) is left alone unless both ends are lost: the live end settles it
(:mod:`ferry.core.cluster.reconcile`). Applying a restart is the caller's
compare-and-swap: ``owner`` still at :attr:`Restart.owner_revision`, the old
node's ``alive`` key still absent and this node still the leader, so a node
that came back, or a second leader, makes it fail instead of doubling a VM.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.nodes import NodeView, node_views
from ferry.core.cluster.placement import VmDemand, place_all
from ferry.core.cluster.roles import Owner, Priority, VmRole, Want, decode_role, decode_want
from ferry.core.cluster.store import Entry
from ferry.errors import FerryError, NoPlacementError


@dataclass(frozen=True)
class Restart:
    uuid: str
    vm: str
    source: str  # the lost node that owned it
    target: str
    owner_revision: int  # compare-and-swap on this
    priority: Priority
    reason: str


@dataclass(frozen=True)
class Refused:
    uuid: str
    vm: str
    source: str
    reason: str


@dataclass(frozen=True)
class HaPlan:
    lost: tuple[str, ...]  # members whose alive key is gone
    restarts: tuple[Restart, ...]
    refused: tuple[Refused, ...]
    nodes: tuple[NodeView, ...]


@dataclass(frozen=True)
class _Candidate:
    uuid: str
    role: VmRole
    owner: Owner
    owner_revision: int


def plan(entries: Iterable[Entry], keys: ClusterKeys) -> HaPlan:
    """The restarts (and refusals) for the lost nodes' VMs; see the module docstring."""
    entries = list(entries)
    nodes = node_views(entries, keys)
    alive = {ClusterKeys.last_part(e.key) for e in entries if e.key.startswith(keys.alive_prefix)}
    lost = sorted(n.name for n in nodes if n.name not in alive)
    members = {n.name for n in nodes}

    configs: dict[str, Entry] = {}
    owners: dict[str, Entry] = {}
    wants: dict[str, Entry] = {}
    for entry in entries:
        if not entry.key.startswith(keys.vms):
            continue
        uuid = ClusterKeys.vm_uuid_of(entry.key)
        part = ClusterKeys.last_part(entry.key)
        table = {"config": configs, "owner": owners, "want": wants}.get(part)
        if table is not None:
            table[uuid] = entry

    def is_lost(node: str | None) -> bool:
        return node is not None and (node not in alive or node not in members)

    candidates: list[_Candidate] = []
    refused: list[Refused] = []
    for uuid, owner_entry in owners.items():
        want = wants.get(uuid)
        if decode_want(want.value if want else None) is not Want.RUNNING:
            continue
        owner = Owner.decode(owner_entry.value)
        if not is_lost(owner.node) or (owner.pending and not is_lost(owner.source)):
            continue
        config = configs.get(uuid)
        if config is None:
            refused.append(Refused(uuid, uuid, owner.node, "its configuration is missing"))
            continue
        try:
            role = decode_role(config.value, key=config.key)
        except FerryError as exc:
            refused.append(Refused(uuid, uuid, owner.node, str(exc)))
            continue
        candidates.append(_Candidate(uuid, role, owner, owner_entry.mod_revision))

    candidates.sort(key=lambda c: (c.role.priority.rank, c.role.spec.name, c.uuid))
    demands = [VmDemand(name=c.role.spec.name, memory=c.role.spec.memory,
                        config_version=c.role.spec.config_version) for c in candidates]  # fmt: skip
    placed = place_all(demands, nodes)  # lost nodes are not up: placement says so
    restarts: list[Restart] = []
    for candidate, (_, where) in zip(candidates, placed, strict=True):
        name, source = candidate.role.spec.name, candidate.owner.node
        if isinstance(where, NoPlacementError):
            refused.append(Refused(candidate.uuid, name, source, str(where)))
            continue
        target = next(n for n in nodes if n.name == where)
        reason = (f"node {source} lost its lease; {name} ({candidate.role.priority} priority) "
                  f"placed on {where} ({target.memory_free // 1024**2} MiB free)")  # fmt: skip
        restarts.append(Restart(candidate.uuid, name, source, where, candidate.owner_revision,
                                candidate.role.priority, reason))  # fmt: skip
    return HaPlan(tuple(lost), tuple(restarts), tuple(refused), tuple(nodes))
