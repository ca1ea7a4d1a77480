"""The replica broker: a cluster as a replication target (``--replica cluster:C``). Pure.

The primary names the target ``cluster:C`` and never a node. It pins the
cluster, not a host: the thumbprint of the CA that issued the replica
cluster's node certificates plus the name :func:`cluster_san` of C, which the
CA writes into the certificate of every node of C (see docs/architecture.md,
*Replica broker*). Any node presenting such a certificate is C. So a cycle
may land on whichever node of C answers; that node hands it to the node that
owns the replica VM in C's store (:func:`route`), and the next cycle lands on
the new owner after a node loss without the primary being told.

A replica cluster admits a primary as a replica host does
(:func:`ferry.core.replica_server.admit`, its settings kept once for the
cluster) and must be at the primary's functional level or newer
(:func:`ferry.core.cluster.crossing.check_replica_level`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from ferry.core.cluster.crossing import check_replica_level
from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.nodes import NodeState, node_views
from ferry.core.cluster.roles import Owner
from ferry.core.cluster.store import Entry
from ferry.core.relationship import Extension, Relationship
from ferry.core.replica_server import Admission, ReplicaServerSettings, admit
from ferry.core.replication.authority import cluster_san
from ferry.core.replication.retention import PointInfo
from ferry.core.spec import VmSpec
from ferry.errors import AuthError, InvalidInputError, NotFoundError, StateError

PREFIX = "cluster:"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class ReplicaTarget:
    """Where ``--replica`` points: a host, or a cluster (the broker)."""

    name: str
    cluster: bool = False

    def __str__(self) -> str:
        return f"{PREFIX}{self.name}" if self.cluster else self.name


def parse_target(text: str) -> ReplicaTarget:
    """``host-4`` or ``cluster:c2``; one line on anything else."""
    if not text.startswith(PREFIX):
        return ReplicaTarget(text)
    name = text[len(PREFIX) :]
    if not _NAME_RE.fullmatch(name):
        raise InvalidInputError(f"invalid replica {text!r}: give a host or cluster:NAME "
                                "(a-z, 0-9, '-')")  # fmt: skip
    return ReplicaTarget(name, cluster=True)


def refuse_cluster_move(vm: str, current: str, wanted: str) -> None:
    """``replication set --replica`` between a host and a cluster is not built: the
    replica VM would have to change stores (a host's catalog, C's etcd) with its
    points. One line with the way that works (remove, then enable)."""
    was, new = parse_target(current), parse_target(wanted)
    if not (was.cluster or new.cluster):
        return
    if was.cluster and new.cluster:
        why = f"VM {vm!r} replicates to {current}; a replica moves between clusters"
    elif was.cluster:
        why = (
            f"VM {vm!r} replicates to {current}, whose HA keeps its replica on a live "
            "node; a replica moves from a cluster to a host"
        )
    else:
        why = f"VM {vm!r} replicates to host {current!r}; a replica moves from a host to a cluster"
    raise InvalidInputError(f"{why} only by 'ferry replication remove {vm}' then "
                            f"'ferry replication enable {vm} --replica {wanted}' "
                            "(a new initial copy); nothing was changed")  # fmt: skip


def refuse_cluster_extension(vm: str, to: str) -> None:
    """Extended replication goes to a host: to a cluster it is not built (the onward
    sender would need C's broker: locate, pin and re-own as the primary's cycles have)."""
    if parse_target(to).cluster:
        raise InvalidInputError(
            f"extended replication of VM {vm!r} to a cluster ({to}) is not built: "
            "extend to a standalone host; nothing was changed"
        )


def resolve_cluster(target: ReplicaTarget, known: Iterable[str]) -> str:
    """The cluster a ``cluster:C`` target names, if the fleet's etcd knows it."""
    names = sorted(known)
    if target.name not in names:
        listed = ", ".join(names) or "none"
        raise NotFoundError(f"unknown cluster {target.name!r} (clusters in this etcd: {listed})")
    return target.name


@dataclass(frozen=True)
class BrokerPin:
    """What a primary pins of a replica cluster: the issuing CA and the cluster's name."""

    cluster: str
    ca_thumbprint: str


def check_presented(pin: BrokerPin, *, ca_thumbprint: str, names: Collection[str],
                    node: str) -> None:  # fmt: skip
    """A node answering for the replica cluster shows a certificate of the pinned CA with
    the cluster's name; anything else is not that cluster."""
    if ca_thumbprint.lower() != pin.ca_thumbprint.lower():
        raise AuthError(f"{node!r} answered for replica cluster {pin.cluster!r} with a "
                        "certificate of another CA than the one pinned")  # fmt: skip
    if cluster_san(pin.cluster) not in names:
        raise AuthError(f"{node!r} is not a node of replica cluster {pin.cluster!r}: its "
                        f"certificate does not name {cluster_san(pin.cluster)}")  # fmt: skip


def admit_primary(settings: ReplicaServerSettings, primary: str, *, cluster: str,
                  primary_level: int, cluster_level: int, vm: str) -> Admission:  # fmt: skip
    """The replica cluster's answer to ``replication enable VM --replica cluster:C``."""
    if not settings.enabled:
        raise AuthError(f"cluster {cluster!r} is not a replica server; enable it with "
                        f"'ferry replica-server enable --cluster {cluster} --volume "
                        "VOLUME --allow PATTERN'")  # fmt: skip
    try:
        admission = admit(settings, primary, server=cluster)
    except AuthError as exc:
        raise AuthError(str(exc).replace(f"host {cluster!r}", f"cluster {cluster!r}")) from exc
    check_replica_level(vm, primary, primary_level, cluster, cluster_level)
    return admission


@dataclass(frozen=True)
class Route:
    """What the node that received a cycle does with it."""

    node: str  # the node that handles it
    local: bool  # this node (else: forward to ``node``)


def route(here: str, *, owner: str | None, pending: bool, alive: Collection[str],
          cluster: str, vm: str) -> Route:  # fmt: skip
    """The node owning the replica VM handles a cycle; any other node forwards it there.

    A replica VM without an owner yet (the first cycle) is taken by the node
    that received it. A cycle refused here (owner down or a move pending) is
    a failed cycle: the primary's next cycle, at its frequency, tries again.
    """
    if owner is None:
        return Route(here, local=True)
    if pending:
        raise StateError(f"replica VM {vm!r} is moving inside cluster {cluster!r}; the next "
                         "cycle lands on its new node")  # fmt: skip
    if owner != here and owner not in alive:
        raise StateError(f"replica VM {vm!r}'s node {owner!r} in cluster {cluster!r} is down; "
                         "the next cycle lands on the node the cluster restarts it on")  # fmt: skip
    return Route(owner, local=owner == here)


class ReplicaRecord(BaseModel):
    """``replicas/<uuid>/record``: what a node needs to hold a replica VM of the cluster.

    The owner puts it after every change (offer, point, file, terms); a node
    that becomes the owner writes it into its own catalog before it answers
    a cycle. The chain's files are on the cluster's volume, which every node
    sees at one path, so the record names them and nothing is copied.
    """

    model_config = ConfigDict(frozen=True)

    spec: VmSpec
    relationship: Relationship
    points: tuple[tuple[int, float, str, int], ...] = ()
    # Its extended replication onward (the extended host pins the cluster's nodes).
    extension: Extension | None = None

    def chain(self) -> list[PointInfo]:
        return [PointInfo(id=i, time=t, file=f, size=n) for i, t, f, n in self.points]

    @staticmethod
    def points_of(chain: Iterable[PointInfo]) -> tuple[tuple[int, float, str, int], ...]:
        return tuple((p.id, p.time, p.file, p.size) for p in chain)


@dataclass(frozen=True)
class ReOwn:
    """The HA leader gives a lost node's replica VM to an up node (compare-and-swap)."""

    uuid: str
    source: str
    target: str
    owner_revision: int


def reowns(entries: Iterable[Entry], keys: ClusterKeys) -> list[ReOwn]:
    """The replica VMs whose owner node is lost (its lease gone), each to the up node
    with the most free memory (nothing runs: the next cycle is all it does there)."""
    entries = list(entries)
    nodes = node_views(entries, keys)
    up = sorted((n for n in nodes if n.state is NodeState.UP),
                key=lambda n: (-n.memory_free, n.name))  # fmt: skip
    alive = {ClusterKeys.last_part(e.key) for e in entries if e.key.startswith(keys.alive_prefix)}
    members = {n.name for n in nodes}
    found: list[ReOwn] = []
    for entry in entries:
        if not (entry.key.startswith(keys.replicas) and entry.key.endswith("/owner")):
            continue
        owner = Owner.decode(entry.value).node
        if (owner in alive and owner in members) or not up:
            continue
        found.append(ReOwn(ClusterKeys.replica_uuid_of(entry.key), owner, up[0].name,
                           entry.mod_revision))  # fmt: skip
    return sorted(found, key=lambda r: r.uuid)
