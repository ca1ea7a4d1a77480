"""Cluster nodes in memory: ClusterServices on one MemoryStore and one peer network.

For unit tests of anything built on a :class:`~ferry.host.cluster.membership.Membership`::

    lab = MemoryCluster(tmp_path)
    one = lab.node("host-1")
    await one.create("c1", [lab.url], None)
    await lab.node("host-2").join("c1", [lab.url], None)
    lab.clock.advance(10); await lab.clock.settle()      # leases not renewed expire

Nodes do not run their background loops (``autostart=False``): a test drives
an election round and the HA pass with ``await lab.lead("host-1")`` and keeps
a lease with ``await lab.renew("host-1")``. Any URL other than :attr:`url`
is an etcd that does not answer (StoreUnavailableError naming it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ferry import __version__
from ferry.core.cluster.store import ClusterStore
from ferry.core.cluster.timing import ClusterTimings
from ferry.errors import StoreUnavailableError
from ferry.host.cluster.ha import HaLeader
from ferry.host.cluster.membership import Membership
from ferry.host.cluster.service import ClusterService, NodeIdentity
from ferry.host.cluster.volumes import VolumeService
from ferry.peer.server import PeerServer
from ferry.testing.clock import FakeClock
from ferry.testing.peers import MemoryNetwork
from ferry.testing.store import MemoryStore

GIB = 1024**3


class MemoryCluster:
    """Several nodes' cluster services over one in-memory etcd; see the module docstring."""

    def __init__(self, base: Path, *, ttl_s: int = 4) -> None:
        self.base = base
        self.clock = FakeClock()
        self.store = MemoryStore(self.clock)
        self.url = "http://etcd.test:2379"  # the one etcd that answers
        self.network = MemoryNetwork()
        self.timings = ClusterTimings.from_ttl(ttl_s)
        self.services: dict[str, ClusterService] = {}
        self.volumes: dict[str, VolumeService] = {}
        self.memory: dict[str, int] = {}
        self.opened: list[tuple[tuple[str, ...], Path | None]] = []

    def open_store(self, endpoints: Sequence[str], tls_dir: Path | None) -> ClusterStore:
        self.opened.append((tuple(endpoints), tls_dir))
        if self.url not in endpoints:
            raise StoreUnavailableError(
                f"cannot reach etcd at {', '.join(endpoints)}: connection refused"
            )
        return self.store

    def node(self, name: str, *, functional_level: int = 3, memory_free: int = 4 * GIB
             ) -> ClusterService:  # fmt: skip
        """Node ``name``'s service (made once; a second call returns the same one)."""
        if name in self.services:
            return self.services[name]
        self.memory[name] = memory_free
        data_dir = self.base / name
        data_dir.mkdir(parents=True, exist_ok=True)
        service = self._service(name, data_dir, functional_level)
        server = PeerServer()
        volumes = VolumeService(service.context, self.network.connector(name), node=name)
        volumes.register(server)
        self.network.join(name, server)
        self.services[name] = service
        self.volumes[name] = volumes
        return service

    def _service(self, name: str, data_dir: Path, functional_level: int) -> ClusterService:
        me = NodeIdentity(name=name, url=f"https://{name}.test:8443", version=__version__,
                          functional_level=functional_level, data_dir=data_dir,
                          tls_dir=data_dir / "tls")  # fmt: skip
        return ClusterService(me, timings=self.timings, open_store=self.open_store,
                              memory_free=lambda: self.memory[name], leader_work=HaLeader,
                              clock=self.clock.time, autostart=False)  # fmt: skip

    def restart(self, name: str) -> ClusterService:
        """A new service for ``name`` on its old data dir, as after an agent restart."""
        old = self.services[name]
        service = self._service(name, old.me.data_dir, old.me.functional_level)
        self.volumes[name].context = service.context
        self.services[name] = service
        return service

    def membership(self, name: str) -> Membership:
        m = self.services[name].membership
        assert m is not None, f"{name} is in no cluster"
        return m

    async def lead(self, name: str) -> bool:
        """One election round of ``name`` (and its HA pass if it leads)."""
        loops = self.services[name].loops
        assert loops is not None
        return await loops.lead_once()

    async def renew(self, *names: str) -> None:
        for name in names:
            m = self.membership(name)
            await m.store.keepalive(m.lease)

    async def expire(self, name: str) -> None:
        """``name``'s lease runs out now (as etcd's clock would let it)."""
        self.store.expire(self.membership(name).lease)
