"""A full disk on the replica host: one clear line, nothing half-written, nothing registered.

The file system is /dev/full (every write fails with ENOSPC), reached through a
symlink where the receiver writes, so no OS call is mocked.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.adapters.catalog import Catalog
from ferry.adapters.os_errors import os_error
from ferry.core.replica_server import AllowEntry, ReplicaServerSettings
from ferry.core.replication import PointInfo
from ferry.core.spec import VmSpec
from ferry.core.vmstate import VmState
from ferry.errors import StorageError, StorageFullError, error_from_code
from ferry.host.config import HostConfig
from ferry.host.replication.chain import RecoveryPointChain
from ferry.host.replication.endpoints import ReplicationEndpoints
from ferry.host.replication.receiver import ReplicaStore
from ferry.host.replication.sender import offer_replica
from ferry.host.replication.server import ReplicaServer
from ferry.peer.replication import Offer
from ferry.peer.server import PeerServer
from ferry.testing.peers import MemoryNetwork, host_cert

UUID = "0a7e0000-0000-4000-8000-0000000000f1"
FULL = Path("/dev/full")

pytestmark = pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")


def test_enospc_and_edquot_are_storage_full_with_the_free_space(tmp_path: Path) -> None:
    for code in (errno.ENOSPC, errno.EDQUOT):
        error = os_error("cannot write x", OSError(code, "No space", str(tmp_path / "x")))
        assert isinstance(error, StorageFullError) and error.code == "storage-full"
        assert str(error).startswith("cannot write x: No space (") and "MiB free)" in str(error)
    assert type(os_error("cannot write x", OSError(errno.EIO, "I/O error"))) is StorageError
    assert type(error_from_code("storage-full", "m")) is StorageFullError


def _store(tmp_path: Path) -> tuple[ReplicaStore, Catalog, Path]:
    config = HostConfig(name="host-2", data_dir=tmp_path / "host-2", tls_dir=tmp_path / "tls")
    config.data_dir.mkdir()
    catalog = Catalog(config.data_dir)
    server = ReplicaServer(catalog, host="host-2")
    storage = tmp_path / "replicas"
    server.configure(ReplicaServerSettings(enabled=True, storage=str(storage),
                                           allow=(AllowEntry(pattern="host-1"),)))  # fmt: skip
    return ReplicaStore(config, catalog, server), catalog, storage


def test_an_offer_whose_kernel_does_not_fit_is_withdrawn(tmp_path: Path) -> None:
    store, catalog, storage = _store(tmp_path)
    network = MemoryNetwork()
    peer_server = PeerServer()
    ReplicationEndpoints(store, mover=None, adopt=None).register(peer_server)  # type: ignore[arg-type]
    network.join("host-2", peer_server)
    network.join("host-1", PeerServer())
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k" * 100_000)
    spec = VmSpec(uuid=UUID, name="web", config_version=1, memory=1 << 27, kernel=str(kernel))
    (storage / UUID).mkdir(parents=True)
    (storage / UUID / "kernel.partial").symlink_to(FULL)  # the replica storage is full

    async def offer() -> None:
        async with network.connector("host-1").connect("host-2", "https://host-2") as peer:
            await offer_replica(peer, spec, sender="host-1", level=1, frequency_s=300,
                                recovery_points=4, primary_url="https://host-1")  # fmt: skip

    with pytest.raises(StorageFullError) as caught:
        asyncio.run(offer())
    line = str(caught.value)
    assert "\n" not in line
    assert f"replica storage {storage} on host 'host-2' is full" in line, line
    assert "--storage" in line and "nothing was kept on host 'host-2'" in line, line
    assert catalog.vms() == [] and catalog.relationships() == []  # no replica VM registered
    assert not (storage / UUID).exists()


def test_a_kernel_that_does_not_fit_leaves_no_partial(tmp_path: Path) -> None:
    store, _, storage = _store(tmp_path)
    spec = VmSpec(uuid=UUID, name="web", config_version=1, memory=1 << 27)
    offer = Offer(spec=spec, frequency_s=300, recovery_points=4, functional_level=1)

    async def run() -> None:
        await store.accept(host_cert("host-1"), offer)
        (storage / UUID / "kernel.partial").symlink_to(FULL)

        async def chunks() -> AsyncIterator[bytes]:
            yield b"k" * 100_000

        await store.receive_file(host_cert("host-1"), UUID, "kernel", chunks())

    with pytest.raises(StorageFullError, match="free space there or choose another --storage"):
        asyncio.run(run())
    assert list((storage / UUID).iterdir()) == []


def test_flatten_into_a_full_vm_dir_leaves_the_chain_as_it_was(tmp_path: Path) -> None:
    storage, vm_dir = tmp_path / "replica", tmp_path / "vms" / UUID
    storage.mkdir()
    vm_dir.mkdir(parents=True)
    (storage / "kernel").write_bytes(b"k" * 100_000)
    (vm_dir / "kernel").symlink_to(FULL)
    spec = VmSpec(uuid=UUID, name="web", config_version=1, memory=1 << 27,
                  kernel=str(storage / "kernel"))  # fmt: skip
    chain = RecoveryPointChain(Catalog(tmp_path))
    with pytest.raises(StorageFullError, match=rf"cannot copy the kernel of VM 'web' to {vm_dir}"):
        asyncio.run(chain.flatten(spec, storage, vm_dir))
    assert list(vm_dir.iterdir()) == []
    assert (storage / "kernel").read_bytes() == b"k" * 100_000


def test_remove_into_a_full_vm_dir_keeps_the_replica_until_a_retry(tmp_path: Path) -> None:
    store, catalog, storage = _store(tmp_path)
    spec = VmSpec(uuid=UUID, name="web", config_version=1, memory=1 << 27)
    offer = Offer(spec=spec, frequency_s=300, recovery_points=4, functional_level=1)
    primary = host_cert("host-1")
    vm_dir = store.config.data_dir / "vms" / UUID
    kernel = storage / UUID / "kernel"

    async def run() -> None:
        await store.accept(primary, offer)
        kernel.write_bytes(b"k" * 100_000)
        catalog.update_spec(catalog.get(UUID).spec.model_copy(update={"kernel": str(kernel)}))
        catalog.add_point(UUID, PointInfo(id=1, time=1.0, file="base"))
        vm_dir.mkdir(parents=True)
        (vm_dir / "kernel").symlink_to(FULL)  # the VM dir is full
        with pytest.raises(StorageFullError, match="run 'ferry replication remove' again"):
            await store.remove(primary, UUID)
        assert catalog.get(UUID).state is VmState.REPLICA and store.relationship(UUID)
        assert list(vm_dir.iterdir()) == [] and kernel.exists()
        assert (await store.remove(primary, UUID)).kept_replica_vm  # space freed: it completes
        assert catalog.get(UUID).state is VmState.OFF and catalog.relationships() == []
        assert (vm_dir / "kernel").read_bytes() == b"k" * 100_000 and not kernel.exists()

    asyncio.run(run())
