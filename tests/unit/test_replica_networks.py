"""The replica side of network maps: offers refused or mapped, maps changed (a real catalog)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ferry.adapters.catalog import Catalog
from ferry.core.replica_server import AllowEntry, ReplicaServerSettings
from ferry.core.spec import NicSpec, VmSpec
from ferry.core.vmstate import VmOp, VmState
from ferry.errors import InvalidInputError, StateError
from ferry.host.config import HostConfig, NetworkConfig
from ferry.host.replication.receiver import ReplicaStore
from ferry.host.replication.server import ReplicaServer
from ferry.peer.replication import Offer, ReplicaChanges
from ferry.testing.peers import host_cert

UUID = "0b1c2d3e-0000-4000-8000-000000000001"
MAC = "02:00:00:00:0b:01"
PRIMARY = host_cert("host-1")
SPEC = VmSpec(uuid=UUID, name="web", config_version=1, memory=1 << 27,
              nics=(NicSpec(network="lab", mac=MAC),))  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> ReplicaStore:
    """Host-2 as a replica server for host-1, with networks 'prod' and 'dmz' (no 'lab')."""
    networks = {name: NetworkConfig(bridge=f"br-{name}") for name in ("prod", "dmz")}
    config = HostConfig(name="host-2", data_dir=tmp_path / "host-2", tls_dir=tmp_path / "tls",
                        networks=networks)  # fmt: skip
    config.data_dir.mkdir()
    catalog = Catalog(config.data_dir)
    server = ReplicaServer(catalog, host="host-2")
    server.configure(ReplicaServerSettings(enabled=True, storage=str(tmp_path / "replicas"),
                                           allow=(AllowEntry(pattern="host-1"),)))  # fmt: skip
    return ReplicaStore(config, catalog, server)


def offer(network_map: dict[str, str] | None = None) -> Offer:
    return Offer(spec=SPEC, frequency_s=300, recovery_points=4, functional_level=1,
                 network_map=network_map or {})  # fmt: skip


def test_an_offer_for_a_network_the_replica_lacks_is_refused_and_nothing_is_kept(
    store: ReplicaStore,
) -> None:
    with pytest.raises(InvalidInputError) as refused:
        asyncio.run(store.accept(PRIMARY, offer()))
    assert str(refused.value).startswith("host 'host-2' has no network 'lab', which VM 'web'")
    with pytest.raises(InvalidInputError, match=r"no network 'nowhere' \(--network-map lab="):
        asyncio.run(store.accept(PRIMARY, offer({"lab": "nowhere"})))
    assert store.catalog.find(UUID) is None and store.catalog.relationship(UUID) is None


def test_a_mapped_offer_keeps_the_mac_on_the_mapped_network(store: ReplicaStore) -> None:
    asyncio.run(store.accept(PRIMARY, offer({"lab": "prod"})))
    record = store.catalog.get(UUID)
    assert record.state is VmState.REPLICA
    assert record.spec.nics == (NicSpec(network="prod", mac=MAC),)  # a failover starts it so
    rel = store.catalog.relationship(UUID)
    assert rel is not None and rel.network_map == {"lab": "prod"}


def test_a_new_map_maps_the_primarys_nics_anew_or_is_refused(store: ReplicaStore) -> None:
    asyncio.run(store.accept(PRIMARY, offer({"lab": "prod"})))
    primary_nics = [NicSpec(network="lab", mac=MAC)]
    with pytest.raises(InvalidInputError, match="no network 'nowhere'"):
        store.update(PRIMARY, UUID, ReplicaChanges(network_map={"lab": "nowhere"},
                                                   nics=primary_nics))  # fmt: skip
    assert store.catalog.get(UUID).spec.nics == (NicSpec(network="prod", mac=MAC),)
    store.update(PRIMARY, UUID, ReplicaChanges(network_map={"lab": "dmz"}, nics=primary_nics))
    assert store.catalog.get(UUID).spec.nics == (NicSpec(network="dmz", mac=MAC),)
    rel = store.catalog.relationship(UUID)
    assert rel is not None and rel.network_map == {"lab": "dmz"}


def test_a_failed_over_replica_keeps_its_networks(store: ReplicaStore) -> None:
    asyncio.run(store.accept(PRIMARY, offer({"lab": "prod"})))
    store.states.apply(UUID, VmOp.RELEASE)  # as a failover leaves it: off, on its overlays
    changes = ReplicaChanges(network_map={"lab": "dmz"}, nics=[NicSpec(network="lab", mac=MAC)])
    with pytest.raises(StateError, match="once it is a replica again"):
        store.update(PRIMARY, UUID, changes)
    assert store.catalog.get(UUID).spec.nics == (NicSpec(network="prod", mac=MAC),)
