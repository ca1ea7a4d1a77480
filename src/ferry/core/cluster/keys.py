"""Where a cluster keeps what in its store: the one key layout, pure.

Everything of cluster ``C`` lives under ``/ferry/clusters/C/``::

    meta                    {"name", "created", "functional_level"}   the cluster itself
    members/<node>          {"name", "url", "version", "functional_level", "joined",
                             "draining"}                               permanent until leave
    alive/<node>            {"name", "memory_free", "at"}  put with the node's lease:
                                                           gone = the lease expired
    fenced/<node>           {"at", "reason"}               the node fenced itself (or was
                                                           declared fenced); cleared on rejoin
    leader                  "<node>"                       with the leader's lease (election)
    volumes/<name>          {"name", "path"}
    vms/<uuid>/config       {"spec": VmSpec JSON, "priority", "volume"}
    vms/<uuid>/owner        {"node", "since"}              changed only by compare-and-swap
    vms/<uuid>/want         "running" | "off"               what HA restores
    vms/<uuid>/state        "running" | "off" | ...         the VM's state as its owner last
                                                           saw it (put by its reconciler)
    vms/<uuid>/replication  Takeover JSON (relationship + recent cycles)   put by the owner
                            (compare-and-swap on owner) whenever it changes
    vms/<uuid>/left         "1"     copy-roles gave the VM to another cluster
    vms/<uuid>/handed       "<node>" the old cluster's owner handed its replication over
    identities/<node>       {"name", "url", "thumbprint"}   the node's host certificate, for
                                                            a replica of a clustered VM
    names/<vm name>         "<uuid>"                       unique names (create only if absent)
    replica-server          ReplicaServerSettings JSON     the cluster as a replica target
    replicas/<uuid>/owner   {"node", "since"}              the node holding a replica VM
                                                           (compare-and-swap, like vms/)
    replicas/<uuid>/record  ReplicaRecord JSON             the replica VM, its relationship and
                                                           chain, put by the owner per change
    events/<revision-padded> {"at", "kind", "node", "vm", "reason"}

(``cluster volume add`` keeps nothing in the store while it probes: the
tokens travel in the peer requests, see :mod:`ferry.peer.cluster`.)

A node's state is read from these: ``fenced/<node>`` present -> fenced;
``alive/<node>`` absent -> down; ``members/<node>.draining`` -> draining;
else up.
"""

from __future__ import annotations

ROOT = "/ferry/clusters/"


class ClusterKeys:
    """The keys of one cluster."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.prefix = f"{ROOT}{cluster}/"

    @property
    def meta(self) -> str:
        return self.prefix + "meta"

    @property
    def leader(self) -> str:
        return self.prefix + "leader"

    @property
    def members(self) -> str:
        return self.prefix + "members/"

    def member(self, node: str) -> str:
        return self.members + node

    @property
    def alive_prefix(self) -> str:
        return self.prefix + "alive/"

    def alive(self, node: str) -> str:
        return self.alive_prefix + node

    @property
    def fenced_prefix(self) -> str:
        return self.prefix + "fenced/"

    def fenced(self, node: str) -> str:
        return self.fenced_prefix + node

    @property
    def volumes(self) -> str:
        return self.prefix + "volumes/"

    def volume(self, name: str) -> str:
        return self.volumes + name

    @property
    def vms(self) -> str:
        return self.prefix + "vms/"

    def vm_config(self, uuid: str) -> str:
        return f"{self.vms}{uuid}/config"

    def vm_owner(self, uuid: str) -> str:
        return f"{self.vms}{uuid}/owner"

    def vm_want(self, uuid: str) -> str:
        return f"{self.vms}{uuid}/want"

    def vm_state(self, uuid: str) -> str:
        return f"{self.vms}{uuid}/state"

    def vm_replication(self, uuid: str) -> str:
        return f"{self.vms}{uuid}/replication"

    def vm_left(self, uuid: str) -> str:
        """Set when ``cluster copy-roles`` gave the VM to another cluster: the node that
        still has it drops its local entry (not a plain VM, as after ``vm remove``)."""
        return f"{self.vms}{uuid}/left"

    def vm_handed(self, uuid: str) -> str:
        """``"<node>"``: after ``cluster copy-roles``, the old cluster's owner ``node`` sent
        the VM's pending points, told its replica this cluster's hosts and wrote
        ``vm_replication`` here from a clean stop, so the new owner keeps its bitmap."""
        return f"{self.vms}{uuid}/handed"

    @property
    def identities(self) -> str:
        return self.prefix + "identities/"

    def identity(self, node: str) -> str:
        return self.identities + node

    @property
    def replica_server(self) -> str:
        return self.prefix + "replica-server"

    @property
    def replicas(self) -> str:
        return self.prefix + "replicas/"

    def replica_owner(self, uuid: str) -> str:
        return f"{self.replicas}{uuid}/owner"

    def replica_record(self, uuid: str) -> str:
        return f"{self.replicas}{uuid}/record"

    @staticmethod
    def replica_uuid_of(key: str) -> str:
        """The uuid in a ``.../replicas/<uuid>/...`` key."""
        return key.split("/replicas/", 1)[1].split("/", 1)[0]

    @property
    def names(self) -> str:
        return self.prefix + "names/"

    def name(self, vm_name: str) -> str:
        return self.names + vm_name

    @property
    def events(self) -> str:
        return self.prefix + "events/"

    def event(self, revision: int) -> str:
        return f"{self.events}{revision:020d}"

    @staticmethod
    def vm_uuid_of(key: str) -> str:
        """The uuid in a ``.../vms/<uuid>/...`` key."""
        return key.split("/vms/", 1)[1].split("/", 1)[0]

    @staticmethod
    def last_part(key: str) -> str:
        return key.rsplit("/", 1)[-1]


def cluster_names(keys: list[str]) -> list[str]:
    """The clusters that ``.../meta`` keys under :data:`ROOT` name."""
    return sorted({k[len(ROOT) :].split("/", 1)[0] for k in keys if k.endswith("/meta")})
