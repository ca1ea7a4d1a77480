"""Failover between hosts without QEMU: real failover service, catalogs, store and peer layer.

:func:`failover_host` builds one host: a real
:class:`~ferry.host.failover.service.FailoverService`, job registry, replica
store and SQLite catalog, with :class:`~ferry.testing.vms.FakeVms` for the VM
service, :class:`FakePrimary` for this host's primary side of replication,
overlays that are plain files, and a peer server on a
:class:`~ferry.testing.peers.MemoryNetwork` that also answers ``hello``.
:func:`replicate` then puts a VM on one host and its replica, with a chain of
recovery points, on another, as a finished initial copy leaves them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry import __version__
from ferry.adapters.catalog import Catalog, VmRecord
from ferry.core.relationship import Extension, InitialMethod, Relationship, Role
from ferry.core.replica_server import AllowEntry, ReplicaServerSettings
from ferry.core.replication import PointInfo, ReplicationState
from ferry.core.spec import DiskSpec, VmSpec
from ferry.core.versions import MAX_CONFIG_VERSION
from ferry.core.vmstate import VmState
from ferry.errors import NotFoundError
from ferry.host.config import HostConfig
from ferry.host.failover.service import FailoverService
from ferry.host.jobs import JobRegistry
from ferry.host.replication.receiver import ReplicaStore, disk_file
from ferry.host.replication.server import ReplicaServer
from ferry.peer.replication import HELLO, REPLICA, Hello, ReplicaState
from ferry.peer.routes import NoBody
from ferry.peer.server import Call, PeerServer
from ferry.testing.netdev import FakeLinks
from ferry.testing.peers import MemoryNetwork
from ferry.testing.vms import FakeVms


@dataclass
class FakePrimary:
    """This host's primary side of replication, as failover uses it (no cycles run)."""

    catalog: Catalog
    host: str
    calls: list[tuple[str, str]] = field(default_factory=list)
    sync_outcome: dict[str, Any] = field(default_factory=lambda: {"result": "ok", "point": 9})
    enabled: list[dict[str, Any]] = field(default_factory=list)
    # Set to make sync_now() wait until the test sets it (to act during a cycle).
    sync_gate: asyncio.Event | None = None

    def primary_of(self, name: str) -> tuple[VmRecord, Relationship]:
        record = self.catalog.find(name)
        rel = None if record is None else self.catalog.relationship(record.uuid)
        if record is None or rel is None or rel.role is not Role.PRIMARY:
            raise NotFoundError(f"VM {name!r} is not replicated from host {self.host!r}")
        return record, rel

    async def sync_now(self, name: str) -> dict[str, Any]:
        self.calls.append(("sync", name))
        if self.sync_gate is not None:
            await self.sync_gate.wait()
        return dict(self.sync_outcome)

    def forget(self, vm_uuid: str) -> None:
        self.calls.append(("forget", vm_uuid))
        self.catalog.delete_relationship(vm_uuid)

    async def enable(self, name: str, *, replica: str, replica_url: str, frequency_s: int,
                     recovery_points: int, initial: InitialMethod, media_dir: str | None,
                     compression: bool, initial_after: float | None = None,
                     network_map: Mapping[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
        self.calls.append(("enable", name))
        self.enabled.append({"vm": name, "replica": replica, "initial": initial})
        return {"vm": name, "primary": self.host, "replica": replica, "state": "initial-copy"}


@dataclass
class FailoverHost:
    name: str
    url: str
    config: HostConfig
    catalog: Catalog
    vms: FakeVms
    jobs: JobRegistry
    store: ReplicaStore
    replication: FakePrimary
    failover: FailoverService
    server: PeerServer

    def vm(self, name: str) -> VmRecord | None:
        return self.catalog.find(name)

    def rel(self, vm_uuid: str) -> Relationship | None:
        return self.catalog.relationship(vm_uuid)


async def touch_overlay(overlay: Path, backing: Path, size: int) -> None:
    """Overlays for tests: a file naming its backing file (no qemu-img)."""
    if not backing.exists():
        raise NotFoundError(f"backing file {backing} is missing")
    overlay.write_text(f"overlay of {backing.name}\n")


def failover_host(network: MemoryNetwork, root: Path, name: str) -> FailoverHost:
    """One host on ``network`` with its failover service, answering failover and hello."""
    config = HostConfig(name=name, data_dir=root / name, tls_dir=root / "tls",
                        run_dir=root / f"run-{name}", qemu_img="false")  # fmt: skip
    config.data_dir.mkdir(parents=True)
    catalog = Catalog(config.data_dir)
    vms = FakeVms(config, catalog)
    jobs = JobRegistry(catalog)
    store = ReplicaStore(config, catalog, ReplicaServer(catalog, host=name), links=FakeLinks())
    replication = FakePrimary(catalog, name)
    failover = FailoverService(vms, jobs, store, replication, network.connector(name),
                               make_overlay=touch_overlay)  # fmt: skip
    server = PeerServer()
    failover.register(server)

    async def hello(call: Call[NoBody]) -> Hello:
        role = call.caller.role.value if call.caller.role else "none"
        return Hello(name=name, version=__version__, functional_level=config.functional_level,
                     caller=call.caller.common_name, caller_role=role,
                     cpu_models=vms.cpu.models)  # fmt: skip

    async def replica(call: Call[NoBody]) -> ReplicaState:
        return await store.checked_state(call.params["uuid"])

    server.handle(HELLO, hello)
    server.handle(REPLICA, replica)  # what a planned failover asks the replica host first
    network.join(name, server)
    return FailoverHost(name, f"https://{name}", config, catalog, vms, jobs, store, replication,
                        failover, server)  # fmt: skip


def replicate(network: MemoryNetwork, primary: FailoverHost, replica: FailoverHost,
              name: str = "web", *, points: int = 2, recovery_points: int = 4) -> str:  # fmt: skip
    """A running VM on ``primary``, replicated to ``replica`` with ``points`` points; its UUID."""
    uuid = f"{name}-0000-uuid"
    disk = primary.config.data_dir / "vms" / uuid / "disk0.qcow2"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"disk")
    spec = VmSpec(uuid=uuid, name=name, config_version=MAX_CONFIG_VERSION, memory=128 << 20,
                  disks=(DiskSpec(path=str(disk), size=1 << 20),))  # fmt: skip
    primary.catalog.add_vm(spec, VmState.RUNNING)
    common = {
        "vm_uuid": uuid,
        "vm_name": name,
        "primary": primary.name,
        "replica": replica.name,
        "state": ReplicationState.REPLICATING,
        "recovery_points": recovery_points,
    }
    primary.catalog.put_relationship(Relationship(
        role=Role.PRIMARY, replica_url=replica.url,
        thumbprint=network.certs[replica.name].thumbprint, **common))  # fmt: skip
    # Replication may flow back: the primary admits the replica host as a primary.
    primary.store.server.configure(ReplicaServerSettings(
        enabled=True, storage=str(primary.config.data_dir / "replicas"),
        allow=(AllowEntry(pattern=replica.name),)))  # fmt: skip

    storage = replica.config.data_dir / "replicas" / uuid
    storage.mkdir(parents=True)
    stems = ["base", *(f"p{i}" for i in range(2, points + 1))]
    for stem in stems:
        disk_file(storage, stem, 0).write_bytes(stem.encode())
    replica.catalog.add_vm(replica.store.replica_spec(spec, storage, stems[-1]), VmState.REPLICA)
    replica.catalog.put_relationship(Relationship(
        role=Role.REPLICA, primary_url=primary.url, storage=str(storage),
        thumbprint=network.certs[primary.name].thumbprint, **common))  # fmt: skip
    now = time.time()
    for i, stem in enumerate(stems, start=1):
        replica.catalog.add_point(uuid, PointInfo(id=i, time=now - 60 * (points - i), file=stem))
    return uuid


def extend(network: MemoryNetwork, replica: FailoverHost, extended: FailoverHost,
           vm_uuid: str) -> None:  # fmt: skip
    """``replica``'s copy of the VM extended to ``extended``, its initial copy done."""
    rel = replica.catalog.relationship(vm_uuid)
    record = replica.catalog.find(vm_uuid)
    assert rel is not None and record is not None, "replicate() the VM first"
    replica.catalog.put_extension(Extension(
        vm_uuid=vm_uuid, vm_name=rel.vm_name, host=extended.name, url=extended.url,
        frequency_s=300, thumbprint=network.certs[extended.name].thumbprint,
        state=ReplicationState.REPLICATING))  # fmt: skip
    storage = extended.config.data_dir / "replicas" / vm_uuid
    storage.mkdir(parents=True)
    disk_file(storage, "base", 0).write_bytes(b"base")
    spec = extended.store.replica_spec(record.spec, storage, "base")
    extended.catalog.add_vm(spec, VmState.REPLICA)
    extended.catalog.put_relationship(Relationship(
        vm_uuid=vm_uuid, vm_name=rel.vm_name, role=Role.REPLICA, primary=replica.name,
        replica=extended.name, primary_url=replica.url, storage=str(storage),
        thumbprint=network.certs[replica.name].thumbprint, origin=rel.primary,
        origin_url=rel.primary_url, state=ReplicationState.REPLICATING))  # fmt: skip
    extended.catalog.add_point(vm_uuid, PointInfo(id=1, time=time.time(), file="base"))
