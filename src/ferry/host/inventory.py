"""What the planner asks a host: its VMs' disks and needs, dirty rates, and the link to a peer.

Three answers, each bounded in time: :meth:`InventoryService.inventory` (free
memory, volumes, each VM's disk allocation, volume, cluster, priority, CPU
model and networks; no QEMU is asked), :meth:`InventoryService.dirty_rate`
(a running VM's QEMU measures for a second or two) and
:meth:`InventoryService.probe` (this agent sends N bytes to a peer's
``/v1/peer/probe`` over the agents' mutual-TLS channel and times it: the
bandwidth a move or a replication from here to there can expect).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ferry.adapters import dirty_rate, guest_memory
from ferry.core.migration import locate_on_volume
from ferry.core.plan.agent_facts import (
    DirtyRateView,
    DiskUsage,
    HostInventory,
    ProbeRequest,
    ProbeView,
    VmInventory,
)
from ferry.core.vmstate import VmState
from ferry.errors import ConflictError, FerryError, InvalidInputError
from ferry.host.cluster.vms import ClusterVms
from ferry.host.vms.service import VmService
from ferry.peer import probe as wire
from ferry.peer.client import Connector, Timeout
from ferry.peer.routes import Upload
from ferry.peer.server import Call, PeerServer

log = logging.getLogger(__name__)

CHUNK = 1024**2
PROBE_TIMEOUT_S = 30.0


class InventoryService:
    def __init__(
        self,
        vms: VmService,
        peers: Connector,
        *,
        memory_free: Callable[[], int],
        url: str,
        cluster_vms: ClusterVms | None = None,
    ) -> None:
        self.vms = vms
        self.peers = peers
        self.memory_free = memory_free
        self.url = url
        self.cluster_vms = cluster_vms
        self._measuring: dict[str, asyncio.Lock] = {}

    def register(self, server: PeerServer) -> None:
        server.handle(wire.PROBE, self.receive_probe)

    # -- inventory ---------------------------------------------------------------

    async def inventory(self) -> HostInventory:
        config = self.vms.config
        volumes = self.vms.catalog.volumes()
        cluster = None
        if self.cluster_vms is not None and self.cluster_vms.context.membership is not None:
            cluster = self.cluster_vms.context.membership.cluster
        views = []
        for record in self.vms.list():
            spec = record.spec
            disks = []
            for disk in spec.disks:
                where = locate_on_volume(disk.path, volumes)
                disks.append(DiskUsage(path=disk.path, size=disk.size, format=disk.format,
                                       allocation=await asyncio.to_thread(_allocation, disk.path),
                                       volume=where[0] if where else None))  # fmt: skip
            vm_cluster = self.cluster_vms.cluster_of(record.uuid) if self.cluster_vms else None
            nics: tuple[Any, ...] = getattr(spec, "nics", ())
            views.append(VmInventory(
                name=spec.name, uuid=spec.uuid, state=record.state.value, memory=spec.memory,
                cpus=spec.cpus, config_version=spec.config_version, disks=disks,
                cluster=vm_cluster, priority=await self._priority(vm_cluster, record.uuid),
                cpu_model=getattr(spec, "cpu_model", None),
                networks=sorted({str(nic.network) for nic in nics}),
            ))  # fmt: skip
        return HostInventory(name=config.name, url=self.url,
                             functional_level=config.functional_level,
                             memory=self.vms.host_memory, free_memory=self.memory_free(),
                             cpus=self.vms.host_cpus, volumes=volumes, cluster=cluster,
                             vms=views)  # fmt: skip

    async def _priority(self, cluster: str | None, uuid: str) -> str | None:
        if cluster is None or self.cluster_vms is None:
            return None
        try:
            m = self.cluster_vms.membership(cluster)
            async with asyncio.timeout(3):
                role = await self.cluster_vms.role_of(m, uuid)
        except (FerryError, TimeoutError) as exc:
            log.info("priority of VM %s not known: %s", uuid, exc)
            return None
        return None if role is None else str(role.priority.value)

    # -- dirty rate --------------------------------------------------------------

    async def dirty_rate(self, name: str, seconds: int) -> DirtyRateView:
        record = self.vms.get(name)
        if record.state is not VmState.RUNNING:
            return DirtyRateView(vm=record.name, state=record.state.value, dirty_rate_bps=None,
                                 note=f"not measured: the VM is {record.state.value}")  # fmt: skip
        lock = self._measuring.setdefault(record.uuid, asyncio.Lock())
        if lock.locked():
            raise ConflictError(f"the dirty rate of VM {name!r} is being measured already; "
                                "ask again in a few seconds")  # fmt: skip
        async with lock:
            rate = await dirty_rate.measure(self.vms.channel(record), seconds=seconds)
        pid = self.vms.pid_of(record.uuid)
        used = None if pid is None else await asyncio.to_thread(
            guest_memory.nonzero_fraction, pid, record.spec.memory)  # fmt: skip
        return DirtyRateView(vm=record.name, state=record.state.value,
                             dirty_rate_bps=rate.bytes_per_s, calc_time_s=rate.calc_time_s,
                             took_s=rate.took_s, nonzero_fraction=used)  # fmt: skip

    # -- bandwidth ---------------------------------------------------------------

    async def probe(self, request: ProbeRequest) -> ProbeView:
        """Send ``request.bytes`` to the peer and time it, end to end (TLS included)."""
        config = self.vms.config
        if request.to == config.name:
            raise InvalidInputError(f"a bandwidth probe from host {config.name!r} needs "
                                    "another host to go to")  # fmt: skip
        block = os.urandom(CHUNK)  # incompressible, like guest memory and disk data

        async def body() -> AsyncIterator[bytes]:
            left = request.bytes
            while left > 0:
                piece = block[: min(left, CHUNK)]
                left -= len(piece)
                yield piece

        started = time.monotonic()
        async with (
            self.peers.connect(request.to, request.to_url, timeout=Timeout.CONTROL) as peer,
            asyncio.timeout(PROBE_TIMEOUT_S),
        ):
            got = await peer.call(wire.PROBE, data=body())
        seconds = max(time.monotonic() - started, 1e-6)
        if got.bytes != request.bytes:
            raise ConflictError(f"host {request.to!r} received {got.bytes} of the "
                                f"{request.bytes} probe bytes")  # fmt: skip
        return ProbeView(src=config.name, dst=request.to, bytes=got.bytes,
                         seconds=round(seconds, 4), bandwidth_bps=got.bytes / seconds)  # fmt: skip

    async def receive_probe(self, call: Call[Upload]) -> wire.ProbeReceived:
        call.require_host()
        started = time.monotonic()
        total = 0
        async for chunk in call.stream:
            total += len(chunk)
            if total > wire.MAX_PROBE_BYTES:
                raise InvalidInputError(f"a probe carries at most {wire.MAX_PROBE_BYTES} bytes")
        return wire.ProbeReceived(bytes=total, seconds=round(time.monotonic() - started, 4))


def _allocation(path: str) -> int | None:
    """Bytes the image takes on its file system (what a copy of it sends, about)."""
    try:
        return Path(path).stat().st_blocks * 512
    except OSError:
        return None
