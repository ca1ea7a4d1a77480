"""Replication's peer endpoints over the in-memory network: who is refused, who is served.

host-2 holds the replica of ``web`` (its primary is host-1) and received
``moved`` by a live move from host-1. host-3, a ferry host of the same CA, and
an impostor with host-1's name but another certificate call every replication
endpoint about those VMs: each call is refused with 403 and one line naming
the caller, and host-2's catalog is as before. host-1 is served.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from ferry.adapters.catalog import Catalog
from ferry.adapters.pki import CertInfo
from ferry.core.relationship import Relationship, Role
from ferry.core.replica_server import AllowEntry, ReplicaServerSettings
from ferry.core.spec import DiskSpec, VmSpec
from ferry.core.vmstate import VmState
from ferry.errors import AuthError
from ferry.host.config import HostConfig
from ferry.host.jobs import JobRegistry
from ferry.host.replication import handover
from ferry.host.replication.endpoints import ReplicationEndpoints
from ferry.host.replication.receiver import ReplicaStore
from ferry.host.replication.replica_move import ReplicaMover
from ferry.host.replication.sender import PointSender
from ferry.peer.client import PeerClient
from ferry.peer.replication import (
    FILE,
    HASHES,
    MOVE_REPLICA,
    OFFER,
    POINT,
    POINTS,
    REMOVE,
    REPLICA,
    TAKE_OVER,
    UPDATE,
    Offer,
    PrimaryStatus,
    ReplicaChanges,
    ReplicaMoveRequest,
    Takeover,
)
from ferry.peer.server import PeerServer
from ferry.testing.peers import MemoryNetwork, host_cert

REPLICA_UUID = "0a7e0000-0000-4000-8000-000000000001"
MOVED_UUID = "0a7e0000-0000-4000-8000-000000000002"


class PrimaryShim:
    """What :func:`handover.adopt` reads of the primary service, without QEMU."""

    def __init__(self, config: HostConfig, catalog: Catalog, jobs: JobRegistry) -> None:
        self.config = config
        self.catalog = catalog
        self.jobs = jobs
        self.spawned: list[str] = []
        self.scheduler = self

    def spawn(self, key: str) -> None:
        self.spawned.append(key)

    def status(self, name: str) -> dict[str, Any]:
        return {"vm": name, "role": "primary", "state": "replicating"}


@dataclasses.dataclass
class World:
    network: MemoryNetwork
    catalog: Catalog
    primary: PrimaryShim
    storage: Path

    def client(self, caller: str) -> PeerClient:
        return self.network.connector(caller).connect("host-2", "https://host-2")

    def snapshot(self) -> dict[str, Any]:
        c = self.catalog
        return {
            "vms": sorted(
                (r.uuid, r.name, r.state.value, r.spec.model_dump_json()) for r in c.vms()
            ),
            "relationships": sorted(r.model_dump_json() for r in c.relationships()),
            "points": [c.points(REPLICA_UUID), c.points(MOVED_UUID)],
            "jobs": sorted((j.id, j.state) for j in c.jobs()),
            "settings": c.setting("replica_server"),
            "files": sorted(str(p) for p in self.storage.rglob("*")),
        }


@pytest.fixture
def world(tmp_path: Path) -> World:
    config = HostConfig(name="host-2", data_dir=tmp_path / "host-2", tls_dir=tmp_path / "tls")
    config.data_dir.mkdir()
    catalog = Catalog(config.data_dir)
    store = ReplicaStore(config, catalog, _server(catalog, tmp_path))
    storage = tmp_path / "replicas" / REPLICA_UUID
    storage.mkdir(parents=True)
    disk = DiskSpec(path=str(storage / "base-disk0.qcow2"), size=1 << 20, format="qcow2")
    catalog.add_vm(VmSpec(uuid=REPLICA_UUID, name="web", config_version=1, memory=1 << 27,
                          disks=(disk,)), VmState.REPLICA)  # fmt: skip
    catalog.put_relationship(
        Relationship(
            vm_uuid=REPLICA_UUID,
            vm_name="web",
            role=Role.REPLICA,
            primary="host-1",
            replica="host-2",
            thumbprint=host_cert("host-1").thumbprint,
            storage=str(storage),
        )
    )
    catalog.add_vm(VmSpec(uuid=MOVED_UUID, name="moved", config_version=1, memory=1 << 27),
                   VmState.RUNNING)  # fmt: skip
    jobs = JobRegistry(catalog)
    jobs.adopt(
        "move-1",
        "incoming",
        MOVED_UUID,
        "moved",
        "done",
        source="host-1",
        source_thumbprint=host_cert("host-1").thumbprint,
    )
    network = MemoryNetwork()
    server = PeerServer()
    primary = PrimaryShim(config, catalog, jobs)
    mover = ReplicaMover(store, PointSender(config, jobs), None,  # type: ignore[arg-type]
                         "https://host-2", network.connector("host-2"))  # fmt: skip

    async def adopt(caller: CertInfo, takeover: Takeover) -> PrimaryStatus:
        return handover.adopt(primary, caller, takeover)  # type: ignore[arg-type]

    ReplicationEndpoints(store, mover=mover, adopt=adopt).register(server)
    network.join("host-2", server)
    for name in ("host-1", "host-3"):
        network.join(name, PeerServer())
    network.join("impostor", PeerServer(),
                 dataclasses.replace(host_cert("host-1"), thumbprint="f" * 64))  # fmt: skip
    return World(network, catalog, primary, tmp_path / "replicas")


def _server(catalog: Catalog, tmp_path: Path) -> Any:
    from ferry.host.replication.server import ReplicaServer

    server = ReplicaServer(catalog, host="host-2")
    server.configure(ReplicaServerSettings(enabled=True, storage=str(tmp_path / "replicas"),
                                           allow=(AllowEntry(pattern="host-1"),)))  # fmt: skip
    return server


def _takeover(**update: Any) -> Takeover:
    rel = Relationship(vm_uuid=MOVED_UUID, vm_name="moved", role=Role.PRIMARY, primary="host-2",
                       replica="host-3", replica_url="https://host-3")  # fmt: skip
    return Takeover(**rel.model_copy(update=update).model_dump())


async def _stream() -> Any:
    yield b"not a delta stream"


def _calls() -> dict[str, Any]:
    """Every replication endpoint about host-2's objects: (route, body, data, query, params)."""
    uuid = {"uuid": REPLICA_UUID}
    offer = Offer(spec=VmSpec(uuid=REPLICA_UUID, name="web", config_version=1, memory=1 << 27),
                  frequency_s=30, recovery_points=4, functional_level=1)  # fmt: skip
    return {
        "offer": (OFFER, offer, None, None, {}),
        "replica": (REPLICA, None, None, None, uuid),
        "update": (
            UPDATE,
            ReplicaChanges(primary="host-3", thumbprint="c" * 64),
            None,
            None,
            uuid,
        ),
        "remove": (REMOVE, None, None, None, uuid),
        "point": (POINT, None, b"not a delta stream", {"time": "1.0"}, {**uuid, "id": "9"}),
        "points": (POINTS, None, None, None, uuid),
        "file": (FILE, None, b"not a kernel", None, {**uuid, "kind": "kernel"}),
        "hashes": (HASHES, None, None, {"block_size": str(1 << 20)}, uuid),
        "move": (
            MOVE_REPLICA,
            ReplicaMoveRequest(to="host-3", to_url="https://host-3"),
            None,
            None,
            uuid,
        ),
        "take over": (TAKE_OVER, _takeover(), None, None, {}),
    }


@pytest.mark.parametrize("caller", ["host-3", "impostor"])
def test_every_replication_endpoint_refuses_a_stranger(world: World, caller: str) -> None:
    before = world.snapshot()
    refused: dict[str, str] = {}

    async def call_all() -> None:
        for what, (route, body, data, query, params) in _calls().items():
            async with world.client(caller) as peer:
                try:
                    await peer.call(route, body, data=data, query=query, **params)
                except AuthError as exc:
                    refused[what] = str(exc)

    asyncio.run(call_all())
    assert set(refused) == set(_calls()), f"served: {set(_calls()) - set(refused)}"
    name = "host-3" if caller == "host-3" else "host-1"
    for what, message in refused.items():
        assert "\n" not in message and name in message, (what, message)
    assert world.snapshot() == before
    assert world.primary.spawned == []


def test_the_pinned_primary_is_served(world: World) -> None:
    async def run() -> None:
        async with world.client("host-1") as peer:
            state = await peer.call(REPLICA, uuid=REPLICA_UUID)
            assert state.primary == "host-1" and state.points == 0
            assert (await peer.call(POINTS, uuid=REPLICA_UUID)).root == []
            changed = await peer.call(UPDATE, ReplicaChanges(recovery_points=2), uuid=REPLICA_UUID)
            assert changed.recovery_points == 2
            status = await peer.call(TAKE_OVER, _takeover())
            assert status.vm == "moved" and status.role == "primary"

    asyncio.run(run())
    rel = world.catalog.relationship(MOVED_UUID)
    assert rel is not None and rel.primary == "host-2" and rel.replica == "host-3"
    assert world.primary.spawned == [MOVED_UUID]


def test_a_takeover_from_the_vms_source_of_another_move_is_refused(world: World) -> None:
    """host-1 moved ``moved`` here, but then it arrived again, from host-3."""
    world.primary.jobs.adopt("move-2", "incoming", MOVED_UUID, "moved", "done", source="host-3")

    async def run() -> None:
        async with world.client("host-1") as peer:
            with pytest.raises(AuthError, match="last arrived here from 'host-3'"):
                await peer.call(TAKE_OVER, _takeover())

    asyncio.run(run())
    assert world.catalog.relationship(MOVED_UUID) is None
