"""The replica broker's rules (ferry.core.replication.broker)."""

from __future__ import annotations

import pytest

from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.store import Entry
from ferry.core.relationship import Relationship
from ferry.core.relationship import Role as RelRole
from ferry.core.replica_server import AllowEntry, ReplicaServerSettings
from ferry.core.replication.broker import (
    BrokerPin,
    ReplicaRecord,
    ReplicaTarget,
    Route,
    admit_primary,
    check_presented,
    cluster_san,
    parse_target,
    refuse_cluster_extension,
    refuse_cluster_move,
    reowns,
    resolve_cluster,
    route,
)
from ferry.core.replication.retention import PointInfo
from ferry.core.spec import VmSpec
from ferry.errors import AuthError, InvalidInputError, NotFoundError, StateError, VersionError

SETTINGS = ReplicaServerSettings(enabled=True, storage="/vol/csv2",
                                 allow=(AllowEntry(pattern="host-*"),))  # fmt: skip


def test_targets_are_hosts_or_clusters() -> None:
    assert parse_target("host-4") == ReplicaTarget("host-4")
    assert parse_target("cluster:c2") == ReplicaTarget("c2", cluster=True)
    assert str(parse_target("cluster:c2")) == "cluster:c2"
    for bad in ["cluster:", "cluster:C2", "cluster:a/b"]:
        with pytest.raises(InvalidInputError, match="give a host or cluster:NAME"):
            parse_target(bad)


def test_unknown_cluster_is_one_line() -> None:
    assert resolve_cluster(ReplicaTarget("c2", cluster=True), ["c1", "c2"]) == "c2"
    with pytest.raises(NotFoundError, match=r"unknown cluster 'c9' \(clusters in this etcd: c1"):
        resolve_cluster(ReplicaTarget("c9", cluster=True), ["c2", "c1"])


def test_the_pin_is_the_ca_and_the_cluster_name() -> None:
    pin = BrokerPin("c2", "AB" * 32)
    check_presented(pin, ca_thumbprint="ab" * 32, names=["host-5", cluster_san("c2")], node="h5")
    with pytest.raises(AuthError, match="another CA"):
        check_presented(pin, ca_thumbprint="cd" * 32, names=[cluster_san("c2")], node="h5")
    with pytest.raises(AuthError, match="not a node of replica cluster 'c2'"):
        check_presented(pin, ca_thumbprint="ab" * 32, names=[cluster_san("c1")], node="h5")


def test_admission_and_level() -> None:
    got = admit_primary(SETTINGS, "host-1", cluster="c2", primary_level=2, cluster_level=3,
                        vm="web")  # fmt: skip
    assert got.storage == "/vol/csv2" and got.rule == "host-*"
    with pytest.raises(AuthError, match="cluster 'c2' does not accept replication from 'db-1'"):
        admit_primary(SETTINGS, "db-1", cluster="c2", primary_level=2, cluster_level=2, vm="web")
    with pytest.raises(VersionError, match="replica cluster 'c2' is at functional level 1"):
        admit_primary(SETTINGS, "host-1", cluster="c2", primary_level=2, cluster_level=1,
                      vm="web")  # fmt: skip
    with pytest.raises(AuthError, match="enable it with 'ferry replica-server enable --cluster"):
        admit_primary(ReplicaServerSettings(), "host-1", cluster="c2", primary_level=1,
                      cluster_level=1, vm="web")  # fmt: skip


def at(owner: str | None, *, pending: bool = False) -> Route:
    return route("host-5", owner=owner, pending=pending, alive={"host-5", "host-6"},
                 cluster="c2", vm="web")  # fmt: skip


def test_the_owner_handles_a_cycle() -> None:
    assert at(None) == Route("host-5", local=True)  # the first cycle: the receiver takes it
    assert at("host-5") == Route("host-5", local=True)
    assert at("host-6") == Route("host-6", local=False)  # forwarded to the owner
    with pytest.raises(StateError, match="'host-7' in cluster 'c2' is down"):
        at("host-7")
    with pytest.raises(StateError, match="is moving inside cluster 'c2'"):
        at("host-6", pending=True)


def test_the_record_carries_the_chain_and_reowns_pick_an_up_node() -> None:
    spec = VmSpec(name="web", config_version=3, memory=1 << 27)
    rel = Relationship(vm_uuid=spec.uuid, vm_name="web", role=RelRole.REPLICA,
                       primary="host-1", replica="host-2", broker="c2")  # fmt: skip
    chain = [PointInfo(0, 1.0, "base", 10), PointInfo(1, 2.0, "p1", 5)]
    record = ReplicaRecord(spec=spec, relationship=rel, points=ReplicaRecord.points_of(chain))
    again = ReplicaRecord.model_validate_json(record.model_dump_json())
    assert again == record and again.chain() == chain
    keys = ClusterKeys("c2")
    owner = Entry(keys.replica_owner(spec.uuid), b'{"node": "host-2"}', 1, 7, 1)
    assert reowns([owner], keys) == []  # no member is up: nobody to take it


@pytest.mark.parametrize(("current", "wanted", "says"), [
    ("cluster:c2", "host-4", "from a cluster to a host"),
    ("host-2", "cluster:c2", "from a host to a cluster"),
    ("cluster:c2", "cluster:c3", "between clusters"),
])  # fmt: skip
def test_set_replica_between_a_host_and_a_cluster_is_refused_with_the_way(
    current: str, wanted: str, says: str
) -> None:
    with pytest.raises(InvalidInputError) as refused:
        refuse_cluster_move("web", current, wanted)
    line = str(refused.value)
    assert says in line and "\n" not in line
    way = f"'ferry replication enable web --replica {wanted}' (a new initial copy)"
    assert line.endswith(f"'ferry replication remove web' then {way}; nothing was changed")


def test_set_replica_between_hosts_is_not_refused_here() -> None:
    refuse_cluster_move("web", "host-2", "host-3")


def test_extended_replication_to_a_cluster_is_refused_and_to_a_host_is_not() -> None:
    with pytest.raises(InvalidInputError, match=r"to a cluster \(cluster:c3\) is not built"):
        refuse_cluster_extension("web", "cluster:c3")
    refuse_cluster_extension("web", "host-4")
